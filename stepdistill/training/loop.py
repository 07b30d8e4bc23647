"""The generic, algorithm-free training loop (accelerate).

One step ``s`` (0-based; checkpoints and logs count *completed* steps, ``s + 1``):

1. seed python/numpy/torch with ``derive_seed("step", seed, s)`` -- the same on every process, so
   anything random in ``distiller.phase`` agrees across ranks;
2. ``groups = distiller.phase(s)``; one fresh ``cache`` dict per micro-batch (shared by the groups
   of the step, e.g. the generator's detached sample for the critic);
3. for each group, for each of ``grad_accum_steps`` micro-batches ``m``: reseed with
   ``derive_seed("loss", seed, s, position_in_phase, vrank)`` where ``vrank = rank * accum + m``,
   take ``source.batch(s, vrank, world * accum, batch_size)``, compute
   ``distiller.loss(batch, s, group, cache_m)`` under ``accelerator.autocast()`` and back-propagate
   ``loss / accum``;
4. average the group's gradients over processes (``all_reduce`` SUM / world, flattened buckets --
   models are *not* wrapped in DDP: generator losses back-propagate through critics, and DDP's
   hooks and ``requires_grad`` toggling break on that), unscale (fp16), clip, optimizer step,
   LR-scheduler step (linear warm-up counted in that group's own updates), EMA update when the
   group is the EMA group;
5. zero the gradients of *every* parameter of the distiller (generator losses leave gradients on
   critics).

Because seeds and batches are pure functions of ``(seed, step, virtual rank)``, a resumed run is
bit-identical to an uninterrupted one, and 1 process x 2 micro-batches computes the same update
as 2 processes x 1 micro-batch (up to float summation order).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..config import ConfigError, to_dict
from ..data.sources import derive_seed
from .checkpoint import (
    CheckpointError,
    checkpoint_path,
    clean_stale_tmp,
    list_checkpoints,
    load_checkpoint,
    resolve_resume,
    rotate_checkpoints,
    save_checkpoint,
)
from .ema import EMA
from .images import save_samples

__all__ = ["train", "config_hash", "TRAJECTORY_FREE_KEYS"]

logger = logging.getLogger("stepdistill.training")

#: TrainConfig fields that do not change the optimisation trajectory (excluded from the config hash,
#: so a run may be resumed with a larger max_steps or other logging settings without a warning).
TRAJECTORY_FREE_KEYS = (
    "output_dir",
    "max_steps",
    "resume",
    "log_every_steps",
    "sample_every_steps",
    "num_sample_images",
    "checkpoint_every_steps",
    "checkpoints_total_limit",
    "report_to",
    "progress",
    "num_workers",
)

_MIXED_PRECISION = ("no", "bf16", "fp16")
_BUCKET_NUMEL = 1 << 23  # 32 MiB of fp32 per all-reduce


# ---------------------------------------------------------------------------------------------
# configuration checks


def _plain_config(run_config: Any) -> dict | None:
    if run_config is None:
        return None
    if dataclasses.is_dataclass(run_config):
        return to_dict(run_config)
    if isinstance(run_config, dict):
        return to_dict(run_config)
    raise TypeError(f"run_config must be a dict or a config dataclass, got {type(run_config).__name__}")


def config_hash(cfg: Any, run_config: dict | None = None) -> str:
    """Hash of everything that shapes the trajectory (run_config if given, else the TrainConfig)."""
    if run_config is not None:
        data = dict(run_config)
        if isinstance(data.get("train"), dict):
            data["train"] = {k: v for k, v in data["train"].items() if k not in TRAJECTORY_FREE_KEYS}
        data.pop("description", None)
    else:
        data = {k: v for k, v in to_dict(cfg).items() if k not in TRAJECTORY_FREE_KEYS}
    text = json.dumps(data, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _validate(cfg: Any) -> None:
    def need(cond: bool, key: str, msg: str) -> None:
        if not cond:
            raise ConfigError(f"train.{key}: {msg}, got {getattr(cfg, key)!r}")

    def is_int(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    need(
        isinstance(cfg.output_dir, (str, os.PathLike)) and str(cfg.output_dir) != "",
        "output_dir",
        "must be a path",
    )
    need(is_int(cfg.batch_size) and cfg.batch_size >= 1, "batch_size", "must be an integer >= 1")
    need(is_int(cfg.max_steps) and cfg.max_steps >= 0, "max_steps", "must be an integer >= 0")
    need(
        is_int(cfg.grad_accum_steps) and cfg.grad_accum_steps >= 1,
        "grad_accum_steps",
        "must be an integer >= 1",
    )
    need(is_int(cfg.warmup_steps) and cfg.warmup_steps >= 0, "warmup_steps", "must be an integer >= 0")
    need(
        is_int(cfg.checkpoint_every_steps) and cfg.checkpoint_every_steps >= 0,
        "checkpoint_every_steps",
        "must be an integer >= 0 (0 = only at the end)",
    )
    need(
        cfg.checkpoints_total_limit is None
        or (is_int(cfg.checkpoints_total_limit) and cfg.checkpoints_total_limit >= 1),
        "checkpoints_total_limit",
        "must be null (keep all) or an integer >= 1",
    )
    need(
        is_int(cfg.log_every_steps) and cfg.log_every_steps >= 0, "log_every_steps", "must be an integer >= 0"
    )
    need(is_int(cfg.sample_every_steps) and cfg.sample_every_steps >= 0, "sample_every_steps", "must be >= 0")
    need(
        cfg.max_grad_norm is None or (isinstance(cfg.max_grad_norm, (int, float)) and cfg.max_grad_norm > 0),
        "max_grad_norm",
        "must be null (no clipping) or > 0",
    )
    need(
        cfg.ema_decay is None or (isinstance(cfg.ema_decay, (int, float)) and 0.0 <= cfg.ema_decay < 1.0),
        "ema_decay",
        "must be null (no EMA) or in [0, 1)",
    )
    need(
        cfg.mixed_precision in _MIXED_PRECISION,
        "mixed_precision",
        f"must be one of {', '.join(_MIXED_PRECISION)}",
    )
    betas = cfg.adam_betas
    need(
        isinstance(betas, (list, tuple)) and len(betas) == 2 and all(0.0 <= float(b) < 1.0 for b in betas),
        "adam_betas",
        "must be two numbers in [0, 1)",
    )
    need(cfg.weight_decay >= 0, "weight_decay", "must be >= 0")
    need(cfg.default_lr > 0, "default_lr", "must be > 0")
    need(isinstance(cfg.lr, dict), "lr", "must map group names to learning rates")
    for k, v in cfg.lr.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
            raise ConfigError(f"train.lr.{k}: learning rate must be a number > 0, got {v!r}")


def _report_to(value: str | None) -> str | None:
    if value is None or str(value).strip().lower() in ("", "none", "null", "false"):
        return None
    return value


def _ensure_writable(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"train.output_dir {str(path)!r} is not a writable folder: {e}") from e


def _make_accelerator(cfg: Any):
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    project = ProjectConfiguration(project_dir=str(cfg.output_dir), logging_dir=str(cfg.output_dir))
    kw = dict(mixed_precision=cfg.mixed_precision, log_with=_report_to(cfg.report_to), project_config=project)
    try:
        return Accelerator(**kw)
    except ValueError as e:
        # AcceleratorState is a per-process singleton; a second train() call in the same process
        # with another mixed_precision (tests, notebooks, benchmark sweeps) is fine when single-process.
        if "already been initialized" not in str(e):
            raise
        from accelerate.state import AcceleratorState, PartialState

        if PartialState().num_processes > 1:
            raise
        AcceleratorState._reset_state()
        return Accelerator(**kw)


# ---------------------------------------------------------------------------------------------
# groups, optimizers


def _trainable_groups(distiller: nn.Module) -> dict[str, nn.Module]:
    groups = distiller.trainable()
    if not isinstance(groups, dict) or not groups:
        raise TypeError("distiller.trainable() must return a non-empty dict {group name: nn.Module}")
    for name, m in groups.items():
        if not isinstance(name, str) or not isinstance(m, nn.Module):
            raise TypeError(
                f"distiller.trainable() entry {name!r} must map a str to an nn.Module, got {type(m)}"
            )
    return dict(groups)


def _group_params(distiller: nn.Module, groups: dict[str, nn.Module]) -> dict[str, list[nn.Parameter]]:
    teacher = getattr(distiller, "teacher", None)
    teacher_ids = {id(p) for p in teacher.parameters()} if isinstance(teacher, nn.Module) else set()
    owner: dict[int, str] = {}
    out: dict[str, list[nn.Parameter]] = {}
    for name, module in groups.items():
        params = [p for p in module.parameters() if p.requires_grad]
        if not params:
            raise ValueError(f"trainable group {name!r} has no parameters with requires_grad=True")
        for p in params:
            if id(p) in teacher_ids:
                raise ValueError(
                    f"trainable group {name!r} contains a parameter of the teacher; the teacher must stay "
                    "frozen (train a copy of it instead)"
                )
            if id(p) in owner:
                raise ValueError(
                    f"a parameter belongs to both group {owner[id(p)]!r} and group {name!r}; "
                    "each parameter must have exactly one optimizer"
                )
            owner[id(p)] = name
        out[name] = params
    stray = [n for n, p in distiller.named_parameters() if p.requires_grad and id(p) not in owner]
    if stray:
        logger.warning(
            "parameters with requires_grad=True outside every trainable group are never updated: %s%s",
            ", ".join(stray[:5]),
            " ..." if len(stray) > 5 else "",
        )
    return out


def _learning_rates(cfg: Any, distiller: Any, groups: dict[str, nn.Module]) -> dict[str, float]:
    unknown = [k for k in cfg.lr if k not in groups]
    if unknown:
        raise ConfigError(
            f"train.lr names unknown group(s) {', '.join(map(repr, unknown))}; "
            f"this algorithm's trainable groups are: {', '.join(groups)}"
        )
    defaults = dict(distiller.lr_defaults() or {}) if hasattr(distiller, "lr_defaults") else {}
    return {g: float(cfg.lr.get(g, defaults.get(g, cfg.default_lr))) for g in groups}


def _warmup(warmup_steps: int) -> Callable[[int], float]:
    def factor(n: int) -> float:  # n = updates done by this group's optimizer
        return 1.0 if warmup_steps <= 0 else min(1.0, (n + 1) / warmup_steps)

    return factor


def _ema_group(distiller: Any, groups: dict[str, nn.Module]) -> str:
    name = getattr(distiller, "ema_group", None)
    if name is None:
        if "generator" in groups:
            name = "generator"
        elif len(groups) == 1:
            name = next(iter(groups))
    if name is None or name not in groups:
        raise ConfigError(
            f"train.ema_decay is set but the EMA group is unclear: groups are {', '.join(groups)}; "
            "name one 'generator' or set the distiller attribute ema_group"
        )
    return name


# ---------------------------------------------------------------------------------------------
# distributed helpers


def _total_norm(grads: list[Tensor]) -> Tensor:
    if hasattr(torch.nn.utils, "get_total_norm"):  # torch >= 2.6
        return torch.nn.utils.get_total_norm(grads)
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch.manual_seed(seed)  # CPU and every CUDA device


@torch.no_grad()
def _all_reduce_grads(params: list[nn.Parameter], world: int) -> None:
    """Average ``.grad`` over processes: SUM then divide, flattened in buckets per dtype."""
    import torch.distributed as dist

    if world <= 1 or not params:
        return
    device = params[0].device
    present = torch.tensor([0.0 if p.grad is None else 1.0 for p in params], device=device)
    dist.all_reduce(present, op=dist.ReduceOp.MAX)  # a grad missing on some ranks counts as zero
    active = [p for p, has in zip(params, present.tolist()) if has > 0]
    for p in active:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        elif p.grad.is_sparse:
            raise NotImplementedError("sparse gradients are not supported by the training loop")
    gloo = dist.get_backend() == "gloo"
    buckets: dict[tuple, list[list[nn.Parameter]]] = {}
    for p in active:
        key = (p.grad.dtype, p.grad.device)
        lst = buckets.setdefault(key, [[]])
        if lst[-1] and sum(q.numel() for q in lst[-1]) + p.numel() > _BUCKET_NUMEL:
            lst.append([])
        lst[-1].append(p)
    for (dtype, _), lists in buckets.items():
        for bucket in lists:
            flat = torch.cat([p.grad.reshape(-1) for p in bucket])
            if gloo and dtype not in (torch.float32, torch.float64):
                flat = flat.float()
            dist.all_reduce(flat)
            flat.div_(world)
            offset = 0
            for p in bucket:
                n = p.grad.numel()
                p.grad.copy_(flat[offset : offset + n].view_as(p.grad))
                offset += n


@torch.no_grad()
def _broadcast_modules(modules: list[nn.Module]) -> None:
    """Make every rank start from rank 0's weights (what DDP does at wrap time)."""
    import torch.distributed as dist

    for m in modules:
        for t in list(m.parameters()) + list(m.buffers()):
            if t.dtype in (torch.bfloat16, torch.float16) and dist.get_backend() == "gloo":
                tmp = t.detach().float()
                dist.broadcast(tmp, 0)
                t.copy_(tmp)
            else:
                dist.broadcast(t.data, 0)


def _on_main(acc: Any, fn: Callable[[], Any], what: str) -> Any:
    """Run ``fn`` on the main process; every rank learns whether it worked (no one hangs)."""
    result, error = None, None
    if acc.is_main_process:
        try:
            result = fn()
        except BaseException as e:  # re-raised below, after the others heard about it
            error = e
    if acc.num_processes > 1:
        import torch.distributed as dist

        flag = torch.tensor([0.0 if error is None else 1.0], device=acc.device)
        dist.broadcast(flag, 0)
        if error is None and flag.item() > 0:
            raise RuntimeError(f"the main process failed while {what}; see its traceback")
    if error is not None:
        raise error
    return result


def _reduce_logs(logs: dict[str, float], acc: Any) -> dict[str, float]:
    if acc.num_processes <= 1:
        return logs
    import torch.distributed as dist

    gathered: list[Any] = [None] * acc.num_processes
    dist.all_gather_object(gathered, logs)
    keys = sorted(set().union(*[g.keys() for g in gathered]))
    return {k: float(np.mean([g[k] for g in gathered if k in g])) for k in keys}


# ---------------------------------------------------------------------------------------------
# logging


class _Meter:
    """Running means of scalars; tensors stay on device until :meth:`flush` (one sync per log)."""

    def __init__(self) -> None:
        self.sums: dict[str, Any] = {}
        self.counts: dict[str, int] = {}

    def add(self, key: str, value: Any) -> None:
        if isinstance(value, Tensor):
            value = value.detach().float().reshape(())
        self.sums[key] = self.sums[key] + value if key in self.sums else value
        self.counts[key] = self.counts.get(key, 0) + 1

    def flush(self) -> dict[str, float]:
        out = {k: float(v) / self.counts[k] for k, v in self.sums.items()}
        self.sums.clear()
        self.counts.clear()
        return out


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        elif isinstance(v, (int, float, str, bool)):
            out[key] = v
        else:
            out[key] = str(v)
    return out


def _truncate_jsonl(path: Path, max_step: int) -> None:
    """Drop log lines of steps a resumed run will redo."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if int(json.loads(line).get("step", 0)) <= max_step:
                keep.append(line)
        except (ValueError, AttributeError):
            continue
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    tmp.write_text("".join(line + "\n" for line in keep))
    os.replace(tmp, path)


def _to_device(batch: Any, device: torch.device) -> dict:
    if not isinstance(batch, dict):
        raise TypeError(
            f"source.batch() must return a dict with 'real' and 'raw_cond', got {type(batch).__name__}"
        )
    return {k: v.to(device, non_blocking=True) if isinstance(v, Tensor) else v for k, v in batch.items()}


def _every(n: int, step: int) -> bool:
    return n > 0 and step % n == 0


# ---------------------------------------------------------------------------------------------
# the loop


def train(
    distiller: nn.Module,
    source: Any,
    cfg: Any,
    *,
    sample_fn: Callable[[int], Tensor | None] | None = None,
    eval_fn: Callable[[int], dict] | None = None,
    accelerator: Any = None,
    run_config: Any = None,
    eval_every_steps: int | None = None,
    step_callback: Callable[[int, dict], None] | None = None,
) -> dict:
    """Train ``distiller`` on batches from ``source`` as ``cfg`` (a ``TrainConfig``) says.

    Args:
        distiller: implements ``trainable() / phase(step) / loss(batch, step, group, cache)``
            (``stepdistill.algorithms.base.Distiller``); optional ``state_dict_extra()`` /
            ``load_state_dict_extra(d)`` (JSON, saved with checkpoints), ``lr_defaults()``, and
            ``ema_group`` (default: ``"generator"``, or the only group).
        source: ``source.batch(step, rank, world, batch_size) -> {"real", "raw_cond"}``, a pure
            function of its arguments (``stepdistill.data.sources``).
        sample_fn: ``sample_fn(step) -> (N, C, H, W)`` images in [-1, 1] (or (N, 2) points, or
            None to skip); called on the main process every ``cfg.sample_every_steps`` and at the
            end, with EMA weights swapped into the EMA group; saved as
            ``output_dir/samples/step-<step:07d>.png``.
        eval_fn: ``eval_fn(step) -> {name: number}``; called on *every* process (it may split work
            across ranks) every ``eval_every_steps`` (default ``cfg.sample_every_steps``) and at the
            end, with EMA weights swapped in; the main process's result is logged as ``eval/<name>``.
        accelerator: an ``accelerate.Accelerator`` to use instead of creating one from ``cfg``.
        run_config: the resolved run configuration (dict or ``RunConfig``), written to
            ``output_dir/config.yaml`` and hashed into checkpoints (a resume with a different
            trajectory-relevant config warns).
        step_callback: ``step_callback(steps_done, logs)`` after every step on every process
            (``logs`` are this process's floats of that step; for tests and custom hooks).

    Returns:
        ``{"step", "logs", "output_dir", "checkpoint", "checkpoints", "samples", "log_file",
        "config_file", "resumed_from", "ema", "ema_group", "ema_model", "accelerator"}`` where
        ``ema`` is the EMA group's ``state_dict()`` with averaged weights (None without EMA) and
        ``ema_model`` the :class:`~stepdistill.training.ema.EMA` object.
    """
    _validate(cfg)
    out_dir = Path(cfg.output_dir)
    if hasattr(distiller, "set_output_dir"):  # algorithms that keep files of their own (DisBack nodes)
        distiller.set_output_dir(out_dir)
    _ensure_writable(out_dir)
    if not callable(getattr(source, "batch", None)):
        raise TypeError("source must have a batch(step, rank, world, batch_size) method")
    acc = accelerator if accelerator is not None else _make_accelerator(cfg)
    rank, world, device = acc.process_index, acc.num_processes, acc.device
    accum = cfg.grad_accum_steps
    run_cfg = _plain_config(run_config)
    chash = config_hash(cfg, run_cfg)

    # -- model, optimizers ------------------------------------------------------------------------
    groups = _trainable_groups(distiller)
    lrs = _learning_rates(cfg, distiller, groups)
    distiller.to(device)
    for m in groups.values():  # in case a group is not registered as a submodule
        m.to(device)
    params = _group_params(distiller, groups)
    betas = (float(cfg.adam_betas[0]), float(cfg.adam_betas[1]))
    optimizers = {
        g: torch.optim.AdamW(params[g], lr=lrs[g], betas=betas, weight_decay=cfg.weight_decay) for g in groups
    }
    schedulers = {
        g: torch.optim.lr_scheduler.LambdaLR(opt, _warmup(cfg.warmup_steps)) for g, opt in optimizers.items()
    }
    scalers = {g: torch.amp.GradScaler(device.type) for g in groups} if acc.scaler is not None else {}
    if world > 1:
        _broadcast_modules(list(groups.values()))
    ema_group = _ema_group(distiller, groups) if cfg.ema_decay is not None else None
    ema = EMA(groups[ema_group], cfg.ema_decay) if ema_group is not None else None

    # -- resume -----------------------------------------------------------------------------------
    _on_main(acc, lambda: clean_stale_tmp(out_dir), "cleaning stale checkpoint folders")
    ckpt = resolve_resume(cfg.resume, out_dir)
    if ckpt is None and cfg.resume is None and list_checkpoints(out_dir):
        raise CheckpointError(
            f"train.output_dir {out_dir} already holds checkpoints but train.resume is null (fresh start); "
            "use train.resume=latest to continue, or another output_dir"
        )
    start = 0
    if ckpt is not None:
        state, extra = load_checkpoint(
            ckpt,
            modules=groups,
            optimizers=optimizers,
            schedulers=schedulers,
            scalers=scalers,
            ema=(ema_group, ema) if ema is not None else None,
        )
        start = int(state["step"])
        if ema is not None and "ema" not in state:
            ema = EMA(groups[ema_group], cfg.ema_decay)  # EMA newly enabled: start from resumed weights
        if state.get("config_hash") not in (None, chash):
            logger.warning(
                "resuming %s with a different configuration (hash %s != %s)",
                ckpt,
                state.get("config_hash"),
                chash,
            )
        if state.get("world_size") not in (None, world):
            logger.warning(
                "resuming %s with %d processes (saved with %s): not bit-exact",
                ckpt,
                world,
                state["world_size"],
            )
        if extra is not None and hasattr(distiller, "load_state_dict_extra"):
            distiller.load_state_dict_extra(extra)
        if start > cfg.max_steps:
            logger.warning(
                "checkpoint %s is at step %d, beyond train.max_steps=%d", ckpt, start, cfg.max_steps
            )
        if acc.is_main_process:
            logger.info("resumed from %s (step %d)", ckpt, start)

    # -- files, trackers --------------------------------------------------------------------------
    log_file = out_dir / "log.jsonl"
    config_file = out_dir / "config.yaml"

    def _prepare_files() -> None:
        import yaml

        data = run_cfg if run_cfg is not None else {"train": to_dict(cfg)}
        tmp = config_file.with_name(f".config.yaml.tmp-{os.getpid()}")
        tmp.write_text(yaml.safe_dump(data, sort_keys=False))
        os.replace(tmp, config_file)
        if start > 0:
            _truncate_jsonl(log_file, start)
        elif log_file.exists():
            log_file.unlink()

    _on_main(acc, _prepare_files, "writing config.yaml")
    own_trackers = accelerator is None and _report_to(cfg.report_to) is not None
    if own_trackers:
        acc.init_trackers(
            "tensorboard", config=_flatten(run_cfg if run_cfg is not None else {"train": to_dict(cfg)})
        )
    trackers = bool(getattr(acc, "trackers", None))

    # -- state of the loop ------------------------------------------------------------------------
    for m in groups.values():
        m.train()
    teacher = getattr(distiller, "teacher", None)
    if isinstance(teacher, nn.Module):
        teacher.eval()
    meter = _Meter()
    last_logs: dict[str, float] = {}
    samples: list[str] = []
    last_ckpt: Path | None = ckpt
    saved_at, sampled_at, evaluated_at = start if ckpt is not None else -1, -1, -1
    warned_nograd: set[str] = set()
    every_eval = cfg.sample_every_steps if eval_every_steps is None else int(eval_every_steps)

    def _checkpoint(step: int) -> None:
        nonlocal last_ckpt, saved_at
        extra = distiller.state_dict_extra() if hasattr(distiller, "state_dict_extra") else None

        def write() -> Path:
            path = save_checkpoint(
                out_dir,
                step,
                modules=groups,
                optimizers=optimizers,
                schedulers=schedulers,
                scalers=scalers,
                ema=(ema_group, ema) if ema is not None else None,
                extra=extra,
                trainer_state={"config_hash": chash, "world_size": world, "grad_accum_steps": accum},
            )
            rotate_checkpoints(out_dir, cfg.checkpoints_total_limit)
            return path

        _on_main(acc, write, f"writing checkpoint {step}")
        last_ckpt = checkpoint_path(out_dir, step)
        saved_at = step

    def _with_ema(fn: Callable[[], Any]) -> Any:
        if ema is None:
            return fn()
        with ema.swapped(groups[ema_group]):
            return fn()

    def _sample(step: int) -> None:
        nonlocal sampled_at
        sampled_at = step

        def run() -> None:
            with torch.no_grad():
                x = _with_ema(lambda: sample_fn(step))
            if x is not None:
                path = save_samples(x, out_dir / "samples" / f"step-{step:07d}.png", title=f"step {step}")
                samples.append(str(path))

        _on_main(acc, run, f"sampling at step {step}")

    def _evaluate(step: int) -> None:
        nonlocal evaluated_at
        evaluated_at = step
        with torch.no_grad():
            metrics = _with_ema(lambda: eval_fn(step)) or {}
        logs = {f"eval/{k}": float(v) for k, v in metrics.items()}
        last_logs.update(logs)
        if acc.is_main_process and logs:
            if trackers:
                acc.log(logs, step=step)
            with open(log_file, "a") as f:
                f.write(json.dumps({"step": step, **logs}) + "\n")

    from tqdm.auto import tqdm

    pbar = tqdm(
        total=cfg.max_steps,
        initial=min(start, cfg.max_steps),
        disable=not (cfg.progress and acc.is_local_main_process),
        desc="train",
        dynamic_ncols=True,
    )
    step_time = 0.0
    try:
        for step in range(start, cfg.max_steps):
            t0 = time.perf_counter()
            _seed_all(derive_seed("step", cfg.seed, step))
            phase = distiller.phase(step)
            phase = [phase] if isinstance(phase, str) else list(phase)
            bad = [g for g in phase if g not in groups]
            if bad:
                raise ValueError(
                    f"distiller.phase({step}) returned unknown group(s) {bad}; groups: {list(groups)}"
                )
            batches: list[dict | None] = [None] * accum
            caches: list[dict] = [{} for _ in range(accum)]
            step_losses: list[Tensor] = []
            step_logs: dict[str, Any] = {}
            for pos, group in enumerate(phase):
                opt = optimizers[group]
                scaler = scalers.get(group)
                for micro in range(accum):
                    vrank = rank * accum + micro
                    if batches[micro] is None:
                        batches[micro] = _to_device(
                            source.batch(step, vrank, world * accum, cfg.batch_size), device
                        )
                    _seed_all(derive_seed("loss", cfg.seed, step, pos, vrank))
                    with acc.autocast():
                        out = distiller.loss(batches[micro], step, group, caches[micro])
                    loss = getattr(out, "loss", None)
                    if not isinstance(loss, Tensor) or loss.numel() != 1:
                        raise TypeError(
                            f"distiller.loss(..., group={group!r}) must return LossOutput with a scalar loss"
                        )
                    if not loss.requires_grad:
                        raise RuntimeError(
                            f"the loss of group {group!r} at step {step} does not require grad; it must depend on "
                            "the group's parameters"
                        )
                    scaled = loss.reshape(()) / accum
                    (scaler.scale(scaled) if scaler is not None else scaled).backward()
                    step_losses.append(loss.detach().float().reshape(()))
                    meter.add(f"loss/{group}", loss)
                    step_logs[f"loss/{group}"] = loss.detach()
                    for k, v in (getattr(out, "logs", None) or {}).items():
                        if isinstance(v, bool) or not isinstance(v, (int, float, Tensor)):
                            continue  # scalars only (strings etc. are not logged)
                        if isinstance(v, Tensor) and v.numel() != 1:
                            continue
                        meter.add(f"{group}/{k}", v)
                        step_logs[f"{group}/{k}"] = v
                _all_reduce_grads(params[group], world)
                if all(p.grad is None for p in params[group]) and group not in warned_nograd:
                    warned_nograd.add(group)
                    logger.warning(
                        "group %r received no gradient at step %d (its loss ignores its weights?)",
                        group,
                        step,
                    )
                if scaler is not None:
                    scaler.unscale_(opt)
                grads = [p.grad for p in params[group] if p.grad is not None]
                if grads:
                    if cfg.max_grad_norm is not None:
                        norm = torch.nn.utils.clip_grad_norm_(
                            [p for p in params[group] if p.grad is not None], cfg.max_grad_norm
                        )
                    else:
                        norm = _total_norm(grads)
                    meter.add(f"grad_norm/{group}", norm)
                    step_logs[f"grad_norm/{group}"] = norm
                meter.add(f"lr/{group}", opt.param_groups[0]["lr"])
                step_logs[f"lr/{group}"] = opt.param_groups[0]["lr"]
                # optional per-step multiplier from the algorithm (e.g. DMD2's regression warm-start)
                lr_scale = float(distiller.lr_scale(step, group)) if hasattr(distiller, "lr_scale") else 1.0
                if lr_scale != 1.0:
                    saved_lrs = [pg["lr"] for pg in opt.param_groups]
                    for pg in opt.param_groups:
                        pg["lr"] = pg["lr"] * lr_scale
                if scaler is not None:
                    scaler.step(opt)
                    scaler.update()
                else:
                    opt.step()
                if lr_scale != 1.0:
                    for pg, lr in zip(opt.param_groups, saved_lrs):
                        pg["lr"] = lr
                schedulers[group].step()
                distiller.zero_grad(set_to_none=True)
                for m in groups.values():
                    m.zero_grad(set_to_none=True)
                if ema is not None and group == ema_group:
                    ema.update(groups[ema_group])
            done = step + 1
            if step_losses:
                vals = torch.stack(step_losses)
                nonfinite = (~torch.isfinite(vals)).sum().float().reshape(1)
                if world > 1:  # every rank stops together (no one hangs in the next all-reduce)
                    import torch.distributed as dist

                    dist.all_reduce(nonfinite)
                if nonfinite.item() > 0:
                    raise FloatingPointError(
                        f"non-finite loss at step {step} (groups {phase}): {vals.tolist()}; lower the learning "
                        "rate, enable max_grad_norm or check the inputs"
                    )
            step_time += time.perf_counter() - t0
            meter.add("time/step_s", time.perf_counter() - t0)
            pbar.update(1)
            if step_callback is not None:
                step_callback(done, {k: float(v) for k, v in step_logs.items()})

            if _every(cfg.log_every_steps, done) or done == cfg.max_steps:
                logs = _reduce_logs(meter.flush(), acc)
                last_logs = {**{k: v for k, v in last_logs.items() if k.startswith("eval/")}, **logs}
                if acc.is_main_process:
                    if trackers:
                        acc.log(logs, step=done)
                    with open(log_file, "a") as f:
                        f.write(json.dumps({"step": done, **logs}) + "\n")
                    post = {k.split("/", 1)[1]: f"{v:.4g}" for k, v in logs.items() if k.startswith("loss/")}
                    pbar.set_postfix(post, refresh=False)
            if _every(cfg.checkpoint_every_steps, done):
                _checkpoint(done)
            if sample_fn is not None and _every(cfg.sample_every_steps, done):
                _sample(done)
            if eval_fn is not None and _every(every_eval, done):
                _evaluate(done)

        final = max(start, cfg.max_steps)
        ran = cfg.max_steps > start
        if saved_at != final and (ran or ckpt is None):
            _checkpoint(final)
        if ran and sample_fn is not None and cfg.sample_every_steps > 0 and sampled_at != final:
            _sample(final)
        if ran and eval_fn is not None and every_eval > 0 and evaluated_at != final:
            _evaluate(final)
    finally:
        pbar.close()
        if own_trackers:
            acc.end_training()

    ema_state = ema.state_dict_for(groups[ema_group]) if ema is not None else None
    return {
        "step": final,
        "logs": last_logs,
        "output_dir": str(out_dir),
        "checkpoint": str(last_ckpt) if last_ckpt is not None else None,
        "checkpoints": [str(p) for _, p in list_checkpoints(out_dir)],
        "samples": samples,
        "log_file": str(log_file),
        "config_file": str(config_file),
        "resumed_from": str(ckpt) if ckpt is not None else None,
        "ema": ema_state,
        "ema_group": ema_group,
        "ema_model": ema,
        "accelerator": acc,
        "train_seconds": step_time,
    }
