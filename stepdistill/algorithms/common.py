"""Machinery shared by the score-distillation algorithms (DMD2, VSD, BOOT, DisBack, MSD).

* :func:`batch_size_of`, :func:`draw_conditions`, :func:`generate_cached` — the per-step plumbing:
  how many samples a batch asks for, its conditions (given or drawn from the teacher), and the
  generator sample of the step, cached so that every phase of one step sees the same ``x``.
* :func:`make_generator` — the one-/few-step student from a teacher copy, with the guard against
  conditioning timesteps where the x0 conversion is ill-posed; :class:`GeneratorOptions` (the
  ``generator_lora`` key every score-distillation Config inherits) makes it a LoRA student.
* :func:`denoising_weight` / :func:`critic_denoising_loss` — the fake-score ("critic") loss in
  the teacher's own parametrisation, written in x0 space.
* :class:`GANHead` + :class:`BottleneckFeatures` — DMD2's discriminator on the critic's bottleneck
  (a forward hook on the diffusers mid-block, no forked UNet code).
* :func:`sample_timestep_indices` — uniform integer timestep indices, the papers' ``20..980``.
* :class:`RegressionPairs` — deterministic (noise, teacher ODE sample) pairs for regression, made on
  the teacher's device on first use, sharded on disk and streamed (:func:`teacher_pairs`: in memory).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import InputError
from ..students import Generator
from ..teachers.base import Cond, DiffusionTeacher, append_dims, cond_index

# ---------------------------------------------------------------------------------------------
# per-step plumbing


def batch_size_of(batch: dict) -> int:
    """Generator batch size: explicit ``batch_size``, else the conditions', else the data's."""
    if batch.get("batch_size") is not None:
        return int(batch["batch_size"])
    for key in ("raw_cond", "real"):
        v = batch.get(key)
        if v is not None:
            return len(v)
    raise ValueError("batch carries neither a batch_size, conditions nor data")


def draw_conditions(teacher: DiffusionTeacher, batch: dict, n: int) -> Cond | None:
    """The batch's conditions encoded by ``teacher``; when the batch carries none (data-free runs),
    ``n`` raw conditions drawn from the teacher's own distribution (global torch RNG).  ``None``
    for an unconditional teacher."""
    raw = batch.get("raw_cond")
    if raw is None:
        raw = teacher.random_raw_conditions(n)
    return teacher.encode_conditions(raw) if raw is not None else None


def generate_cached(
    teacher: DiffusionTeacher,
    generator: Generator,
    batch: dict,
    cache: dict,
    grad: bool,
    rollout: Callable[[Tensor, Cond | None], Tensor] | None = None,
) -> tuple[Tensor, Cond | None]:
    """The generator's sample for this step and its conditions, ``(x, cond)``.

    Without ``grad`` a sample already in ``cache`` (detached) is reused, so a critic phase sees the
    generator phase's ``x``.  Otherwise: conditions (:func:`draw_conditions`), then unit noise
    ``z`` of the generator's sample shape, then ``x = rollout(z, cond)`` (default
    ``generator(z, cond)``) with gradients iff ``grad``; ``x.detach()`` and ``cond`` are cached.
    The draw order (conditions, then noise) is part of the contract: runs are reproducible by seed.
    """
    if not grad and "x" in cache:
        return cache["x"], cache["cond"]
    n = batch_size_of(batch)
    cond = draw_conditions(teacher, batch, n)
    z = torch.randn((n, *generator.sample_shape), device=teacher.sigmas.device)
    with torch.set_grad_enabled(grad):
        x = generator(z, cond) if rollout is None else rollout(z, cond)
    cache["x"], cache["cond"] = x.detach(), cond
    return x, cond


# ---------------------------------------------------------------------------------------------
# the student


class GeneratorTimestepError(InputError):
    """The generator's conditioning timestep makes the x0 conversion ill-posed (see make_generator)."""


#: LoRA targets when ``generator_lora`` names none: the attention projections, which every
#: supported denoiser (SD/SDXL UNets, DiT, SD3 and FLUX transformers) has under these names
DEFAULT_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


@dataclass
class GeneratorLoRA:
    """``algorithm.params.generator_lora``: the student is a peft LoRA adapter on the teacher's network."""

    rank: int = 16
    alpha: float | None = None  # None = rank (scale 1)
    target_modules: list | None = None  # module names (peft matching); None = DEFAULT_LORA_TARGETS
    dropout: float = 0.0


@dataclass
class GeneratorOptions:
    """Options of the student shared by every score-distillation Config (DMD2, VSD, BOOT, and through
    their ``base_params`` MSD and DisBack): a base dataclass, so ``from_dict`` accepts the keys."""

    generator_lora: dict | None = None  # {rank, alpha, target_modules, dropout}; None = full student


def parse_generator_lora(spec: dict | None) -> GeneratorLoRA | None:
    if spec is None:
        return None
    from ..config import from_dict

    lora = from_dict(GeneratorLoRA, spec, prefix="algorithm.params.generator_lora.")
    if lora.rank < 1:
        raise ValueError(f"algorithm.params.generator_lora.rank must be >= 1, got {lora.rank}")
    return lora


def add_generator_lora(denoiser: DiffusionTeacher, lora: GeneratorLoRA, share_with: nn.Module | None = None):
    """Turn the trainable copy ``denoiser`` into a LoRA student: its network is frozen (and, when
    ``share_with`` is the teacher's network of the same dtype, its base weights *are* the teacher's,
    so the student costs only its adapter), a peft LoRA adapter named ``default`` is attached to
    ``lora.target_modules`` (diffusers' ``add_adapter`` where the network has it, so that
    ``get_peft_model_state_dict`` / ``fuse_lora`` / ``save_lora_weights`` work), and only the adapter
    trains.  ``init_lora_weights=True`` (B = 0): the student starts as the teacher."""
    from peft import LoraConfig, inject_adapter_in_model

    net = denoiser.model
    if share_with is not None:
        _share_frozen_weights(net, share_with)
    net.requires_grad_(False)
    targets = list(lora.target_modules or DEFAULT_LORA_TARGETS)
    cfg = LoraConfig(r=lora.rank, lora_alpha=float(lora.alpha if lora.alpha is not None else lora.rank),
                     target_modules=targets, lora_dropout=lora.dropout, init_lora_weights=True)
    try:
        if hasattr(net, "add_adapter"):
            net.add_adapter(cfg)
        else:
            inject_adapter_in_model(cfg, net, adapter_name="default")
            net.peft_config = {"default": cfg}
    except ValueError as e:
        names = sorted({n.split(".")[-1] for n, m in net.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))})
        raise ValueError(
            f"algorithm.params.generator_lora.target_modules {targets} match no layer of {type(net).__name__} ({e}); "
            f"its Linear/Conv2d layer names: {names}"
        ) from e
    for name, p in net.named_parameters():
        p.requires_grad_("lora_" in name)
    return denoiser


def _share_frozen_weights(net: nn.Module, teacher_net: nn.Module) -> None:
    """Point every parameter of ``net`` (a deep copy of ``teacher_net``) at the teacher's own tensor
    when the two have the same dtype (the copy's memory is freed); a no-op otherwise."""
    mods = dict(teacher_net.named_modules())
    for name, mod in net.named_modules():
        src = mods.get(name)
        if src is None:
            continue
        for key, p in list(mod._parameters.items()):
            q = src._parameters.get(key)
            if p is not None and q is not None and q.shape == p.shape and q.dtype == p.dtype:
                mod._parameters[key] = q


#: above this gain of the teacher's x0 conversion (``sqrt((1 - abar) / abar)`` at ``abar = 1e-3``, the
#: former refusal threshold) a requested generator timestep is ill-posed and is lowered
MAX_X0_GAIN = math.sqrt((1 - 1e-3) / 1e-3)
#: ... to the noisiest timestep whose gain is at most this: sigma <= 2 for epsilon teachers, the regime
#: of DMD2's SDXL one-step student (t = 399, sigma 1.56); on the digits teachers the one-shot x0 from
#: pure noise is closest to the teacher's ODE output at sigma ~1.4-2.3 for every parametrisation, and an
#: epsilon student trained at gain 2 / 14.6 / 31.6 reached 1.07x / 3.6x / 7.9x its teacher's FID
#: (benchmarks/results/digits_transfer.json)
WELL_CONDITIONED_X0_GAIN = 2.0


def x0_gain(teacher: DiffusionTeacher, sigma: Tensor | float) -> Tensor:
    """``|d x0 / d output|``: how much the teacher's conversion amplifies an error of the network's
    output at noise level ``sigma`` -- epsilon ``sqrt(1-abar)/sqrt(abar) = sigma``, v-prediction
    ``sqrt(1-abar) < 1``, sample ``1``, flow ``t = sigma/(1+sigma) < 1``; networks that are not
    diffusers adapters (analytic / EDM teachers, which predict x0 through their own preconditioning)
    count as ``1``."""
    sigma = torch.as_tensor(sigma, dtype=torch.float64)
    pt = getattr(teacher, "prediction_type", None)
    if pt == "epsilon":
        return sigma.float()
    if pt == "v_prediction":
        return (sigma / (1 + sigma**2).sqrt()).float()
    if pt == "flow":
        return (sigma / (1 + sigma)).float()
    return torch.ones_like(sigma).float()


def well_posed_timestep(teacher: DiffusionTeacher, max_gain: float = WELL_CONDITIONED_X0_GAIN) -> int | None:
    """The noisiest training timestep index whose x0 conversion gain is at most ``max_gain`` (None when
    none is)."""
    ok = (x0_gain(teacher, teacher.sigmas.detach().cpu()) <= max_gain).nonzero()
    return int(ok.max()) if ok.numel() else None


def make_generator(teacher: DiffusionTeacher, timesteps: list[int], min_abar: float | None = None,
                   lora: dict | GeneratorLoRA | None = None) -> Generator:
    """A student initialised from the teacher, evaluated at ``timesteps`` (descending).

    Conditioning timesteps are chosen by noise level, so that one preset transfers across teachers
    (issue #14): a requested timestep at which the teacher's x0 conversion amplifies the network's
    output errors by more than :data:`MAX_X0_GAIN` (:func:`x0_gain`; it used to be refused) is lowered
    to the noisiest timestep with gain <= :data:`WELL_CONDITIONED_X0_GAIN` (:func:`well_posed_timestep`),
    and a note says so.  Only epsilon teachers are affected: x0 = (x - sqrt(1-abar) eps) / sqrt(abar)
    multiplies the network's error by ``sigma`` -- at t = 999 of a cosine schedule ~20 000, of DDPM's
    linear one 157 -- and one-step training diverges or stalls there.  Requests between the two bounds
    are kept (SD 1.5's DMD2 recipe trains at t = 999, gain 14.6; the t2i presets follow it).  v-prediction, sample and flow conversions have a
    gain <= 1 at every t and keep ``[999]``.  The student still starts from pure noise (unit noise as
    the network input, as DMD2 does at SDXL's 399) and the exported scheduler carries the effective
    timesteps.  Lowering that collapses two timesteps is refused (:class:`GeneratorTimestepError`).

    ``min_abar`` (epsilon wording of the ill-posed bound): ``MAX_X0_GAIN = sqrt((1 - min_abar) / min_abar)``.

    ``lora`` (``algorithm.params.generator_lora``): the student is a LoRA adapter on the teacher's
    network (:func:`add_generator_lora`; only the adapter trains).  Its frozen base is cast to the
    teacher's dtype and then *is* the teacher's tensors (one copy of the network in memory, bf16
    teachers included; the student computes in that dtype, as the teacher does); the adapter is float32.
    """
    spec = lora if isinstance(lora, GeneratorLoRA) or lora is None else parse_generator_lora(lora)
    max_gain = MAX_X0_GAIN if min_abar is None else math.sqrt((1 - min_abar) / min_abar)
    timesteps = [int(t) for t in timesteps]
    n = teacher.num_train_timesteps
    if timesteps and all(0 <= t < n for t in timesteps):
        gains = x0_gain(teacher, teacher.sigmas.detach().cpu()[timesteps])
        if bool((gains > max_gain).any()):
            ok = well_posed_timestep(teacher)
            lowered = ([ok if float(g) > max_gain else t for t, g in zip(timesteps, gains)]
                       if ok is not None else None)
            if lowered is None or any(a <= b for a, b in zip(lowered, lowered[1:])):
                raise GeneratorTimestepError(
                    f"generator timesteps {timesteps}: the teacher's {getattr(teacher, 'prediction_type', '')} "
                    f"x0 conversion amplifies errors by up to {float(gains.max()):.0f}x (limit {max_gain:.1f}); the "
                    f"noisiest well-conditioned timestep is {ok} (gain <= {WELL_CONDITIONED_X0_GAIN}), and lowering to it "
                    f"leaves {lowered} not strictly descending. Use algorithm.params.generator_timesteps with "
                    f"a first entry <= {ok} and descending later ones."
                )
            print(f"[stepdistill] generator timesteps {timesteps} -> {lowered}: the "
                  f"{getattr(teacher, 'prediction_type', '')} teacher's x0 conversion amplifies output errors by "
                  f"{float(gains.max()):.0f}x at {timesteps[0]} (ill-posed above {max_gain:.1f}); {ok} is the noisiest "
                  f"timestep with gain <= {WELL_CONDITIONED_X0_GAIN} (sigma {float(teacher.sigmas[ok]):.2f})", flush=True)
            timesteps = lowered
    copy = teacher.trainable_copy()
    if spec is not None:
        if not isinstance(getattr(copy, "model", None), nn.Module):
            raise ValueError(
                f"algorithm.params.generator_lora needs a diffusers teacher network to adapt; "
                f"{type(teacher).__name__} has none"
            )
        base = getattr(teacher, "model", None)
        first = next(base.parameters(), None) if isinstance(base, nn.Module) else None
        if first is not None:
            # the frozen base in the teacher's dtype, so that it *is* the teacher's tensors (a bf16
            # teacher's fp32 copy would stay: 48 GB for FLUX); the adapter trains in float32, as
            # DMD2's critic_lora does
            copy.model.to(first.dtype)
        add_generator_lora(copy, spec, share_with=base)
        for name, p in copy.model.named_parameters():
            if "lora_" in name and p.dtype != torch.float32:
                p.data = p.data.float()
    pt = getattr(teacher, "prediction_type", None)
    boundary = "lcm" if hasattr(teacher, "alphas_cumprod") and pt in ("epsilon", "v_prediction", "sample") else "none"
    return Generator(copy, timesteps, boundary=boundary)


def sample_timestep_indices(n: int, lo: int, hi: int, device=None, generator=None) -> Tensor:
    """Uniform integer indices in [lo, hi] inclusive (DMD2 uses 20..980 of 1000)."""
    return torch.randint(lo, hi + 1, (n,), generator=generator, device=device)


def frac_to_index(teacher: DiffusionTeacher, frac: float) -> int:
    """The timestep index ``round(frac * T)`` clamped to ``T - 1``: DMD2 / SwiftBrush's
    ``randint(int(0.02 T), int(0.98 T) + 1)`` is indices 20..980 of 1000, and a fraction of 1.0 the
    whole range 0..999 (it was ``round(frac * (T - 1))``, i.e. 20..979)."""
    t = teacher.num_train_timesteps
    return min(int(round(frac * t)), t - 1)


def denoising_weight(sigma: Tensor, kind: str, sigma_data: float = 0.5) -> Tensor:
    """Per-sample weight turning x0-space MSE into the network's native loss.

    epsilon: ||eps_hat - eps||^2 = ||x0_hat - x0||^2 / sigma^2
    v_prediction: ||v_hat - v||^2 = ||x0_hat - x0||^2 (1 + sigma^2) / sigma^2
    flow: ||v_hat - v||^2 = ||x0_hat - x0||^2 / t^2 = ||x0_hat - x0||^2 ((1 + sigma) / sigma)^2
    (x0 = x_t - t v; it was 1, which weights high noise ~1/sigma^2 more than the flow loss does)
    sample: 1;  edm: (sigma^2 + sigma_data^2) / (sigma sigma_data)^2 (Karras et al. 2022)
    """
    if kind == "epsilon":
        return 1 / sigma**2
    if kind == "v_prediction":
        return (1 + sigma**2) / sigma**2
    if kind == "flow":
        return ((1 + sigma) / sigma) ** 2
    if kind == "sample":
        return torch.ones_like(sigma)
    if kind == "edm":
        return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2
    raise ValueError(f"unknown denoising weighting {kind!r}")


def default_weighting(teacher: DiffusionTeacher) -> str:
    """The critic's (fake score's) loss weighting: the teacher's own native loss, except for
    sample-prediction teachers, whose native x0 MSE (weight 1 at every sigma) leaves the critic
    under-trained at low noise -- they get the v-prediction weighting (1 + sigma^2) / sigma^2, which
    is ~1/sigma^2 at low noise like the epsilon, v and flow losses (issue #14: on the digits
    sample+cosine teacher DMD2's student reached 2.9x its teacher's FID with weight 1, 1.6x with
    this one; benchmarks/results/digits_transfer.json)."""
    pt = getattr(teacher, "prediction_type", None)
    if pt == "sample":
        return "v_prediction"
    return pt if pt in ("epsilon", "v_prediction", "flow") else "edm"


def critic_denoising_loss(
    critic: DiffusionTeacher,
    x0: Tensor,
    cond: Cond | None,
    indices: Tensor,
    weighting: str,
    extra_weight: Tensor | None = None,
) -> Tensor:
    """Denoising score matching of the critic on (detached) generator samples, in x0 space."""
    sigma = critic.sigmas[indices].to(x0.device)
    xt = critic.add_noise(x0, sigma)
    pred = critic.denoise_raw(xt, sigma, cond)
    w = denoising_weight(sigma, weighting)
    if extra_weight is not None:
        w = w * extra_weight
    per = ((pred.float() - x0.float()) ** 2).flatten(1).mean(1)
    return (w * per).mean()


# ---------------------------------------------------------------------------------------------
# GAN head on the critic's bottleneck


def bottleneck_module(denoiser: nn.Module) -> nn.Module:
    """The module whose output is the critic's bottleneck feature.

    diffusers UNets: ``mid_block``; DiT transformers: the last transformer block; the analytic
    MLP denoiser: its last hidden activation.  (:class:`BottleneckFeatures` prefers the teacher
    adapter's own ``bottleneck()``, which also knows SD3/FLUX's image stream.)
    """
    model = getattr(denoiser, "model", None)
    if model is not None:
        if getattr(model, "mid_block", None) is not None:
            return model.mid_block
        blocks = getattr(model, "transformer_blocks", None)
        if blocks is not None and len(blocks):
            return blocks[-1]
        raise ValueError(f"cannot find a bottleneck in {type(model).__name__}; expected a mid_block")
    body = getattr(denoiser, "body", None)
    if body is not None:
        return body[-2]  # activation before the output projection
    raise ValueError(f"cannot find a bottleneck in {type(denoiser).__name__}")


def _as_feature(output):
    return output[0] if isinstance(output, (tuple, list)) else output


class _StopForward(Exception):
    """Raised by the bottleneck hook once the feature is captured: the layers after it never run."""


class BottleneckFeatures:
    """Capture the bottleneck output of a denoiser through a forward hook.

    The module and the map from its output to a feature come from the adapter's ``bottleneck()``
    where it has one (UNet mid-block; DiT / SD3 / FLUX image tokens on the patch grid), else from
    :func:`bottleneck_module`.  With ``stop=True`` (``algorithm.params.gan_stop_at_bottleneck``) the
    hook raises a private exception after capturing, so the network's layers after the bottleneck
    (a UNet's up-blocks, the remaining transformer blocks, the output head) are never computed --
    nor back-propagated through.  The hook acts only inside :meth:`__call__`; other forwards of the
    same network (the fake score's denoising loss) run whole.
    """

    def __init__(self, denoiser: nn.Module, stop: bool = True):
        fn = getattr(denoiser, "bottleneck", None)
        if callable(fn):
            self.module, self.to_feature = fn()
        else:
            self.module, self.to_feature = bottleneck_module(denoiser), _as_feature
        self.stop = bool(stop)
        self.feature: Tensor | None = None
        self.armed = False
        self.module.register_forward_hook(self._hook)

    def _hook(self, module, args, output):
        if not self.armed:
            return
        self.feature = self.to_feature(output)
        if self.stop:
            raise _StopForward

    def __call__(self, denoiser: DiffusionTeacher, x: Tensor, sigma: Tensor, cond: Cond | None) -> Tensor:
        self.feature = None
        self.armed = True
        try:
            denoiser.denoise_raw(x, sigma, cond)
        except _StopForward:
            pass
        finally:
            self.armed = False
        if self.feature is None:
            raise RuntimeError("bottleneck hook did not fire")
        return self.feature


# ---------------------------------------------------------------------------------------------
# memory and compute levers


@contextmanager
def frozen(*modules: nn.Module):
    """``requires_grad_(False)`` on the parameters of ``modules`` that require grad, restored on exit
    (exactly those: a peft module's frozen base stays frozen).  A graph built inside still carries
    gradients *through* the modules to their inputs (DMD2's GAN term reaches the generator through
    the critic) but never materialises gradients for their weights."""
    params = [p for m in modules for p in m.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


@contextmanager
def checkpointing_off(*modules: nn.Module):
    """Turn diffusers' gradient checkpointing off in ``modules`` for a forward, restored on exit.

    Needed around a :func:`frozen` forward: checkpointing recomputes the forward during backward,
    after the parameters' ``requires_grad`` is restored, and the recomputed graph then saves other
    tensors than the original one (torch raises ``CheckpointError``)."""
    mods = [m for mod in modules for m in mod.modules() if getattr(m, "gradient_checkpointing", False) is True]
    for m in mods:
        m.gradient_checkpointing = False
    try:
        yield
    finally:
        for m in mods:
            m.gradient_checkpointing = True


@dataclass
class MemoryOptions:
    """Memory levers every score-distillation Config inherits (DMD2, VSD, BOOT; MSD and DisBack
    through ``base_params``)."""

    gradient_checkpointing: list = field(default_factory=list)  # groups whose diffusers networks checkpoint


def enable_gradient_checkpointing(task: nn.Module, groups: list) -> None:
    """Switch on diffusers' ``enable_gradient_checkpointing()`` in every network of the named
    trainable groups (``algorithm.params.gradient_checkpointing``); a group without a network that
    supports it is an error (it would silently save nothing)."""
    if not groups:
        return
    available = task.trainable()
    for g in groups:
        if g not in available:
            raise ValueError(f"algorithm.params.gradient_checkpointing names {g!r}; groups: {list(available)}")
        n = 0
        for m in available[g].modules():
            if getattr(m, "_supports_gradient_checkpointing", False) and hasattr(m, "enable_gradient_checkpointing"):
                m.enable_gradient_checkpointing()
                n += 1
        if n == 0:
            raise ValueError(f"algorithm.params.gradient_checkpointing: group {g!r} holds no network that supports it")


class GANHead(nn.Module):
    """DMD2's classifier branch: conv(4x4, s2) -> GroupNorm -> SiLU blocks down to 1x1, then a 1x1
    conv to one logit.  Vector features (MLP critics) get a 2-layer MLP."""

    def __init__(self, feature_shape: tuple[int, ...]):
        super().__init__()
        if len(feature_shape) == 3:
            c, h, _ = feature_shape
            layers: list[nn.Module] = []
            groups = math.gcd(32, c)
            while h > 1:
                stride = 2 if h >= 4 else 1
                k = 4 if h >= 4 else h
                pad = 1 if h >= 4 else 0
                layers += [nn.Conv2d(c, c, k, stride, pad), nn.GroupNorm(groups, c), nn.SiLU()]
                h = (h + 2 * pad - k) // stride + 1
            layers.append(nn.Conv2d(c, 1, 1))
            self.net = nn.Sequential(*layers)
        elif len(feature_shape) == 1:
            d = feature_shape[0]
            self.net = nn.Sequential(nn.Linear(d, d), nn.SiLU(), nn.Linear(d, 1))
        else:
            raise ValueError(f"GAN head supports (C,H,W) or (D,) features, got {feature_shape}")

    def forward(self, feature: Tensor) -> Tensor:
        return self.net(feature.float()).flatten(1).mean(1)


def gan_feature_shape(critic: DiffusionTeacher, hook: BottleneckFeatures, cond_example: Cond | None) -> tuple:
    with torch.no_grad():
        x = torch.zeros((1, *critic.sample_shape), device=critic.sigmas.device)
        f = hook(critic, x, critic.sigmas[len(critic.sigmas) // 2].reshape(1), cond_index(cond_example, slice(0, 1)))
    return tuple(f.shape[1:])


# ---------------------------------------------------------------------------------------------
# regression pairs


def _ode_sample(teacher: DiffusionTeacher, z: Tensor, cond, num_steps: int, sampler: str, guidance_scale) -> Tensor:
    if hasattr(teacher, "sample"):
        return teacher.sample(cond=cond, num_steps=num_steps, sampler=sampler, noise=z, guidance_scale=guidance_scale)
    return probability_flow_euler(teacher, z, cond, num_steps, guidance_scale)  # analytic teachers


@torch.no_grad()
def teacher_pairs(
    teacher: DiffusionTeacher,
    n: int,
    num_steps: int = 10,
    sampler: str = "ddim",
    seed: int = 1234,
    batch_size: int = 500,
    guidance_scale: float | None = None,
) -> dict[str, Tensor]:
    """Deterministic (noise, raw_cond, x0) triples in memory, on the teacher's device (small sets,
    tests; training runs use :class:`RegressionPairs`, sharded on disk).

    The noise is the scheduler's unit starting noise, i.e. the generator's own input ``z``; it is
    drawn on the CPU from a seeded generator (the same numbers on every device).
    """
    g = torch.Generator().manual_seed(seed)
    device = teacher.sigmas.device
    zs, xs, cs = [], [], []
    for start in range(0, n, batch_size):
        b = min(batch_size, n - start)
        raw = teacher.random_raw_conditions(b, g)
        cond = teacher.encode_conditions(raw) if raw is not None else None
        z = torch.randn((b, *teacher.sample_shape), generator=g, device="cpu").to(device)
        zs.append(z)
        xs.append(_ode_sample(teacher, z, cond, num_steps, sampler, guidance_scale).float())
        if raw is not None:
            cs.append(torch.as_tensor(raw, device="cpu"))
    out = {"noise": torch.cat(zs), "x0": torch.cat(xs)}
    if cs:
        out["raw_cond"] = torch.cat(cs)
    return out


class RegressionPairs:
    """DMD's regression set: (unit noise ``z``, teacher ODE sample ``x0``, raw condition) rows in a
    :class:`~stepdistill.data.pairsets.PairStore` (sharded safetensors + ``index.json`` keyed by the
    teacher's weights and these settings; atomic, resumable, split over ranks, streamed).

    Nothing runs at construction: :meth:`ensure` generates the missing shards on the teacher's
    *current* device (call it after the trainer moved the task: DMD2 does in ``on_step_begin`` of
    its first regression step).  Shard ``i``'s noise and class labels come from a CPU generator
    seeded by ``(seed, i)``; text teachers take the prompts of rows ``i*S .. i*S+S-1`` from
    ``prompt_source`` (``batch(0, i, num_shards, S)``, a pure function) and sample them with CFG
    ``guidance_scale`` (None = the teacher's default), as DMD2 regresses on captioned pairs.
    """

    def __init__(self, teacher: DiffusionTeacher, num_pairs: int, *, num_steps: int = 10, sampler: str = "ddim",
                 guidance_scale: float | None = None, seed: int = 1234, shard_size: int = 256,
                 batch_size: int = 32, root=None, prompt_source=None):
        from ..data.pairsets import PairStore, weight_digest
        from ..utils import cache_dir

        self.teacher, self.num_steps, self.sampler = teacher, int(num_steps), sampler
        self.guidance_scale, self.seed, self.batch_size = guidance_scale, int(seed), max(1, int(batch_size))
        self.prompt_source = prompt_source
        self.text = teacher.random_raw_conditions(1, torch.Generator().manual_seed(0)) is None and (
            getattr(teacher, "tokenizer", None) is not None or getattr(teacher, "text_encoder", None) is not None
        )
        if self.text and prompt_source is None:
            raise ValueError(
                "regression pairs of a text-conditional teacher need prompts: set algorithm.params.regression_prompts "
                "(a prompt file or list) or a prompt source (train.dataset=prompts:<file>)"
            )
        prompts = getattr(prompt_source, "prompts", None)
        settings = {
            "kind": "regression-pairs",
            "teacher": f"{type(teacher).__name__}:{weight_digest(teacher)}",
            "sample_shape": list(teacher.sample_shape),
            "sampler": sampler, "num_steps": self.num_steps,
            "guidance_scale": teacher.guidance_scale if guidance_scale is None else float(guidance_scale),
            "seed": self.seed,
            "prompts": None if prompt_source is None else {
                "source": type(prompt_source).__name__, "seed": getattr(prompt_source, "seed", None),
                "digest": hashlib.sha256("\n".join(prompts).encode()).hexdigest()[:16] if prompts else None},
        }
        root = root if root is not None else cache_dir() / "regression-pairs"
        self.store = PairStore(root, settings, num_pairs, shard_size)
        self.num_rows = self.store.num_rows
        self.ready = False

    @torch.no_grad()
    def make_shard(self, i: int, rows: range):
        from ..data.sources import derive_seed

        t, n = self.teacher, len(rows)
        device = t.sigmas.device
        g = torch.Generator().manual_seed(derive_seed("regression-pairs", self.seed, i))
        z = torch.randn((n, *t.sample_shape), generator=g, device="cpu")
        if self.prompt_source is not None:
            raw = list(self.prompt_source.batch(0, i, self.store.num_shards, self.store.shard_size)["raw_cond"])[:n]
        else:
            raw = t.random_raw_conditions(n, g)
        xs = []
        for s in range(0, n, self.batch_size):
            part = raw[s : s + self.batch_size] if raw is not None else None
            cond = t.encode_conditions(part) if part is not None else None
            xs.append(_ode_sample(t, z[s : s + self.batch_size].to(device), cond, self.num_steps, self.sampler,
                                  self.guidance_scale).float().cpu())
        tensors = {"noise": z, "x0": torch.cat(xs)}
        strings = None
        if isinstance(raw, Tensor):
            tensors["raw_cond"] = raw.long()
        elif raw is not None:
            strings = {"raw_cond": [str(p) for p in raw]}
        return tensors, strings

    def ensure(self, log=None) -> RegressionPairs:
        """Generate the missing shards (this process's share first, see PairStore.ensure)."""
        if not self.ready:
            self.store.ensure(self.make_shard, log=log)
            self.ready = True
        return self

    def rows(self, index: Tensor, device) -> tuple[Tensor, Tensor, Any]:
        """``(noise, x0, raw_cond)`` of the given rows, the tensors on ``device`` (only those rows
        are read from disk)."""
        self.ensure()
        r = self.store.rows(index)
        raw = r.get("raw_cond")
        return r["noise"].to(device), r["x0"].to(device), raw


@torch.no_grad()
def probability_flow_euler(teacher: DiffusionTeacher, z: Tensor, cond, num_steps: int, guidance_scale=None) -> Tensor:
    """Karras-spaced Euler steps of dx/dsigma = (x - D(x, sigma)) / sigma from sigma_max to 0."""
    smax, smin, rho = teacher.sigma_max, teacher.sigma_min, 7.0
    ramp = torch.linspace(0, 1, num_steps, device=z.device)
    sig = (smax ** (1 / rho) + ramp * (smin ** (1 / rho) - smax ** (1 / rho))) ** rho
    sig = torch.cat([sig, torch.zeros(1, device=z.device)])
    x = z * sig[0]
    for i in range(num_steps):
        d = teacher.denoise(x, sig[i], cond, guidance_scale)
        x = x + (x - d) / sig[i] * (sig[i + 1] - sig[i])
    return x


def per_sample_mean_abs(x: Tensor) -> Tensor:
    return append_dims(x.abs().flatten(1).mean(1), x.ndim)


def nonsaturating_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    return F.softplus(logits_fake).mean() + F.softplus(-logits_real).mean()


def nonsaturating_g_loss(logits_fake: Tensor) -> Tensor:
    return F.softplus(-logits_fake).mean()
