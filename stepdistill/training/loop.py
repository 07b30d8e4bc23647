"""The generic, algorithm-free trainer (accelerate).

One step ``s`` (0-based; checkpoints and logs count *completed* steps, ``s + 1``):

1. seed python/numpy/torch with ``derive_seed("step", seed, s)`` -- the same on every process, so
   anything random in ``task.on_step_begin`` / ``task.phase`` agrees across ranks; then
   ``task.on_step_begin(s, is_main)`` (side effects, once per step) and ``groups = task.phase(s)``
   (pure); one fresh ``cache`` dict per micro-batch (shared by the groups of the step, e.g. the
   generator's detached sample for the critic);
2. for each group, for each of ``grad_accum_steps`` micro-batches ``m``: reseed with
   ``derive_seed("loss", seed, s, position_in_phase, vrank)`` where ``vrank = rank * accum + m``,
   take ``source.batch(s, vrank, world * accum, batch_size)``, compute
   ``task.loss(batch, s, group, cache_m)`` under ``accelerator.autocast()`` and back-propagate
   ``loss / accum``;
3. average the group's gradients over processes (``all_reduce`` SUM / world, flattened buckets --
   models are *not* wrapped in DDP: generator losses back-propagate through critics, and DDP's
   hooks and ``requires_grad`` toggling break on that), unscale (fp16), clip, optimizer step at
   ``lr x task.lr_scale(s, group)``, LR-scheduler step (linear warm-up counted in that group's own
   updates), EMA update when the group is the EMA group; zero the gradients of *every* parameter
   of the task (generator losses leave gradients on critics);
4. after the step: callback, log, checkpoint, sample grid, evaluation (each at its interval).

Because seeds and batches are pure functions of ``(seed, step, virtual rank)``, a resumed run is
bit-identical to an uninterrupted one, and 1 process x 2 micro-batches computes the same update
as 2 processes x 1 micro-batch (up to float summation order).

The code follows this map: :meth:`Trainer.setup` (groups, optimizers, EMA, resume, files),
:meth:`Trainer.train_step` (1) with :meth:`Trainer.run_group` (2) and :meth:`Trainer.apply_update`
(3), :meth:`Trainer.after_step` (4) and :meth:`Trainer.finish`.  The hooks it calls are declared in
:mod:`stepdistill.training.task`; the process-group helpers live in
:mod:`stepdistill.training.distributed`.
"""

from __future__ import annotations

import logging
import random
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..config import ConfigError, to_dict
from ..data.sources import derive_seed
from ..errors import Interrupted, NonFiniteLossError
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
from .distributed import (
    all_reduce_grads,
    any_rank,
    broadcast_modules,
    check_launch,
    describe_launch,
    make_accelerator,
    on_main,
    reduce_logs,
    total_norm,
    tracker_backend,
)
from .ema import EMA
from .images import save_samples
from .logs import Meter, append_jsonl, flatten, truncate_jsonl
from .settings import TRAJECTORY_FREE_KEYS, config_hash, ensure_writable, plain_config, validate
from .task import TrainingTask

__all__ = ["Trainer", "train", "config_hash", "changed_keys", "TRAJECTORY_FREE_KEYS"]

logger = logging.getLogger("stepdistill.training")


def seed_all(seed: int) -> None:
    """Seed python, numpy and torch (CPU and every CUDA device) from one 63-bit seed.

    (Not ``accelerate.utils.set_seed``: it passes the seed to numpy unreduced, which accepts only
    32-bit seeds; ``derive_seed`` gives 63-bit ones, and python/torch use all of them.)"""
    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch.manual_seed(seed)


def _flat(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for k, v in data.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out if out or not prefix else {prefix[:-1]: {}}
    return {prefix[:-1]: data}


def changed_keys(old: dict | None, new: dict | None) -> list[str]:
    """``["train.default_lr: 0.0001 -> 0.001", ...]``: the trajectory-relevant dotted keys whose
    values differ between two resolved run configurations (``TRAJECTORY_FREE_KEYS`` and the
    description are ignored, as in the config hash)."""
    if not isinstance(old, dict) or not isinstance(new, dict):
        return []
    free = {f"train.{k}" for k in TRAJECTORY_FREE_KEYS} | {"description"}
    if "train" not in new and "train" not in old:  # a bare TrainConfig
        free |= set(TRAJECTORY_FREE_KEYS)
    a, b = _flat(old), _flat(new)
    missing = object()
    out = []
    for k in sorted(set(a) | set(b)):
        if k in free or any(k.startswith(f + ".") for f in free):
            continue
        va, vb = a.get(k, missing), b.get(k, missing)
        if va != vb:
            show = lambda v: "(unset)" if v is missing else repr(v)  # noqa: E731
            out.append(f"{k}: {show(va)} -> {show(vb)}")
    return out


def _every(n: int, step: int) -> bool:
    return n > 0 and step % n == 0


def _to_device(batch: Any, device: torch.device) -> dict:
    if not isinstance(batch, dict):
        raise TypeError(
            f"source.batch() must return a dict with 'real' and 'raw_cond', got {type(batch).__name__}"
        )
    return {k: v.to(device, non_blocking=True) if isinstance(v, Tensor) else v for k, v in batch.items()}


def _warmup(warmup_steps: int) -> Callable[[int], float]:
    def factor(n: int) -> float:  # n = updates done by this group's optimizer
        return 1.0 if warmup_steps <= 0 else min(1.0, (n + 1) / warmup_steps)

    return factor


def _scalar_logs(out: Any, group: str) -> dict[str, Any]:
    """``out.logs`` entries that are numbers or one-element tensors, keyed ``group/name``."""
    logs = {}
    for k, v in (getattr(out, "logs", None) or {}).items():
        if isinstance(v, bool) or not isinstance(v, (int, float, Tensor)):
            continue  # scalars only (strings etc. are not logged)
        if isinstance(v, Tensor) and v.numel() != 1:
            continue
        logs[f"{group}/{k}"] = v.detach() if isinstance(v, Tensor) else v
    return logs


# ---------------------------------------------------------------------------------------------
# groups, optimizers


def trainable_groups(task: TrainingTask) -> dict[str, nn.Module]:
    groups = task.trainable()
    if not isinstance(groups, dict) or not groups:
        raise TypeError("task.trainable() must return a non-empty dict {group name: nn.Module}")
    for name, m in groups.items():
        if not isinstance(name, str) or not isinstance(m, nn.Module):
            raise TypeError(f"task.trainable() entry {name!r} must map a str to an nn.Module, got {type(m)}")
    return dict(groups)


def group_params(task: TrainingTask, groups: dict[str, nn.Module]) -> dict[str, list[nn.Parameter]]:
    frozen = {id(p) for m in task.frozen_modules() for p in m.parameters()}
    owner: dict[int, str] = {}
    out: dict[str, list[nn.Parameter]] = {}
    for name, module in groups.items():
        params = [p for p in module.parameters() if p.requires_grad]
        if not params:
            raise ValueError(f"trainable group {name!r} has no parameters with requires_grad=True")
        for p in params:
            if id(p) in frozen:
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
    stray = [n for n, p in task.named_parameters() if p.requires_grad and id(p) not in owner]
    if stray:
        logger.warning(
            "parameters with requires_grad=True outside every trainable group are never updated: %s%s",
            ", ".join(stray[:5]),
            " ..." if len(stray) > 5 else "",
        )
    return out


def learning_rates(cfg: Any, task: TrainingTask, groups: dict[str, nn.Module]) -> dict[str, float]:
    unknown = [k for k in cfg.lr if k not in groups]
    if unknown:
        raise ConfigError(
            f"train.lr names unknown group(s) {', '.join(map(repr, unknown))}; "
            f"this algorithm's trainable groups are: {', '.join(groups)}"
        )
    defaults = dict(task.lr_defaults() or {})
    return {g: float(cfg.lr.get(g, defaults.get(g, cfg.default_lr))) for g in groups}


def ema_group_of(task: TrainingTask, groups: dict[str, nn.Module]) -> str:
    name = task.resolve_ema_group(groups)
    if name is None or name not in groups:
        raise ConfigError(
            f"train.ema_decay is set but the EMA group is unclear: groups are {', '.join(groups)}; "
            "name one 'generator' or set the task attribute ema_group"
        )
    return name


# ---------------------------------------------------------------------------------------------
# the trainer


class Trainer:
    """Train a :class:`~stepdistill.training.task.TrainingTask` (see the module docstring).

    ``Trainer(task, source, cfg, ...).run()`` is what :func:`train` does; the stages are methods so
    that each can be read (and replaced in a subclass) on its own."""

    def __init__(self, task: TrainingTask, source: Any, cfg: Any, *, sample_fn=None, eval_fn=None,
                 accelerator: Any = None, run_config: Any = None, eval_every_steps: int | None = None,
                 step_callback: Callable[[int, dict], None] | None = None):
        if not isinstance(task, TrainingTask):
            raise TypeError(f"train() needs a stepdistill.training.TrainingTask, got {type(task).__name__}")
        if not callable(getattr(source, "batch", None)):
            raise TypeError("source must have a batch(step, rank, world, batch_size) method")
        self.task, self.source, self.cfg = task, source, cfg
        self.sample_fn, self.eval_fn, self.step_callback = sample_fn, eval_fn, step_callback
        self.own_accelerator = accelerator is None
        self.acc = accelerator
        self.run_cfg = plain_config(run_config)
        self.every_eval = cfg.sample_every_steps if eval_every_steps is None else int(eval_every_steps)
        self.meter = Meter()
        self.last_logs: dict[str, float] = {}
        self.samples: list[str] = []
        self.warned_nograd: set[str] = set()
        self.step_time = 0.0

    # -- 0. set-up and resume ---------------------------------------------------------------------
    def setup(self) -> None:
        cfg = self.cfg
        validate(cfg)
        self.out_dir = Path(cfg.output_dir)
        self.log_file, self.config_file = self.out_dir / "log.jsonl", self.out_dir / "config.yaml"
        self.task.set_output_dir(self.out_dir)
        ensure_writable(self.out_dir)
        if self.acc is None:
            self.acc = make_accelerator(cfg)
        else:
            check_launch(self.acc)
        acc = self.acc
        self.rank, self.world, self.device = acc.process_index, acc.num_processes, acc.device
        self.accum = cfg.grad_accum_steps
        self.chash = config_hash(cfg, self.run_cfg)
        if acc.is_main_process and cfg.progress:
            print(f"[stepdistill] training {self.task.name}: {describe_launch(acc, cfg)}", flush=True)
        logger.info("launch: %s", describe_launch(acc, cfg))
        self._setup_groups()
        self._resume()
        on_main(acc, self._prepare_files, "writing config.yaml")
        self.own_trackers = self.own_accelerator and tracker_backend(cfg.report_to) is not None
        if self.own_trackers:
            acc.init_trackers("tensorboard", config=flatten(self._config_data()))
        self.trackers = bool(getattr(acc, "trackers", None))
        for m in self.groups.values():
            m.train()
        for m in self.task.frozen_modules():
            m.eval()

    def _setup_groups(self) -> None:
        cfg, task = self.cfg, self.task
        self.groups = groups = trainable_groups(task)
        lrs = learning_rates(cfg, task, groups)
        task.to(self.device)
        for m in groups.values():  # in case a group is not registered as a submodule
            m.to(self.device)
        self.prepare_groups(groups)
        self.params = group_params(task, groups)
        betas = (float(cfg.adam_betas[0]), float(cfg.adam_betas[1]))
        self.optimizers = {
            g: torch.optim.AdamW(self.params[g], lr=lrs[g], betas=betas, weight_decay=cfg.weight_decay)
            for g in groups
        }
        self.schedulers = {
            g: torch.optim.lr_scheduler.LambdaLR(opt, _warmup(cfg.warmup_steps)) for g, opt in self.optimizers.items()
        }
        self.scalers = (
            {g: torch.amp.GradScaler(self.device.type) for g in groups} if self.acc.scaler is not None else {}
        )
        self.ema_group = ema_group_of(task, groups) if cfg.ema_decay is not None else None
        self.ema = EMA(groups[self.ema_group], cfg.ema_decay) if self.ema_group is not None else None

    def prepare_groups(self, groups: dict[str, nn.Module]) -> None:
        """Before the optimizers exist: every rank starts from rank 0's weights (the FSDP2 trainer,
        :mod:`stepdistill.training.sharded`, also shards the groups here)."""
        if self.world > 1:
            broadcast_modules(list(groups.values()))

    def reduce_grads(self, group: str, params: list[nn.Parameter]) -> None:
        """Average the group's gradients over processes (sharded groups: FSDP2 did it in backward)."""
        all_reduce_grads(params, self.world)

    def load_state(self, ckpt: Path) -> tuple[dict, dict | None]:
        """Restore groups, optimizers, schedulers, scalers and EMA from ``ckpt``; (trainer_state, extra)."""
        return load_checkpoint(ckpt, modules=self.groups, optimizers=self.optimizers,
                               schedulers=self.schedulers, scalers=self.scalers, ema=self._ema_pair())

    def _ema_pair(self):
        return (self.ema_group, self.ema) if self.ema is not None else None

    def _resume(self) -> None:
        from accelerate.logging import get_logger

        log = get_logger("stepdistill.training")  # warnings once, from the main process
        cfg, out_dir = self.cfg, self.out_dir
        on_main(self.acc, lambda: clean_stale_tmp(out_dir), "cleaning stale checkpoint folders")
        ckpt = resolve_resume(cfg.resume, out_dir, warn=log.warning)
        if ckpt is None and cfg.resume is None and list_checkpoints(out_dir):
            raise CheckpointError(
                f"train.output_dir {out_dir} already holds checkpoints but train.resume is null (fresh start); "
                "use train.resume=latest to continue, or another output_dir"
            )
        self.resumed_from, self.last_ckpt, self.start = ckpt, ckpt, 0
        self.saved_at, self.sampled_at, self.evaluated_at = (0 if ckpt is not None else -1), -1, -1
        if ckpt is None:
            return
        state, extra = self.load_state(ckpt)
        self.start = self.saved_at = int(state["step"])
        if self.ema is not None and "ema" not in state:  # EMA newly enabled: start from resumed weights
            self.ema = EMA(self.groups[self.ema_group], cfg.ema_decay)
        if state.get("config_hash") not in (None, self.chash):
            changed = changed_keys(self._saved_config(state), self._config_data())
            what = ("; ".join(changed) if changed else
                    f"keys unknown: the checkpoint has no readable config, hash {state.get('config_hash')} != {self.chash}")
            log.warning("resuming %s with a different configuration: %s", ckpt, what)
        if state.get("world_size") not in (None, self.world):
            log.warning("resuming %s with %d processes (saved with %s): not bit-exact", ckpt, self.world,
                        state["world_size"])
        if extra is not None:
            self.task.load_state_dict_extra(extra)
        if self.start > cfg.max_steps:
            log.warning("checkpoint %s is at step %d, beyond train.max_steps=%d", ckpt, self.start, cfg.max_steps)
        log.info("resumed from %s (step %d)", ckpt, self.start)
        if self.acc.is_main_process:
            print(f"[stepdistill] resuming from {ckpt} (step {self.start} of {cfg.max_steps})", flush=True)

    def _trajectory_config(self) -> dict:
        """What the config hash covers (the run config without ``TRAJECTORY_FREE_KEYS`` and the
        description), saved in each checkpoint so that a resume can name the keys that differ."""
        data = dict(self._config_data())
        if isinstance(data.get("train"), dict):
            data["train"] = {k: v for k, v in data["train"].items() if k not in TRAJECTORY_FREE_KEYS}
        data.pop("description", None)
        return data

    def _saved_config(self, state: dict) -> dict | None:
        """The configuration the checkpoint was trained with: its trainer state's copy, else the run
        folder's config.yaml (still the previous run's: it is rewritten after the resume)."""
        if isinstance(state.get("config"), dict):
            return state["config"]
        try:
            import yaml

            data = yaml.safe_load(self.config_file.read_text())
        except (OSError, yaml.YAMLError):  # a missing / damaged config.yaml only loses the key list
            return None
        return data if isinstance(data, dict) else None

    def _config_data(self) -> dict:
        return self.run_cfg if self.run_cfg is not None else {"train": to_dict(self.cfg)}

    def _prepare_files(self) -> None:
        import os

        import yaml

        tmp = self.config_file.with_name(f".config.yaml.tmp-{os.getpid()}")
        tmp.write_text(yaml.safe_dump(self._config_data(), sort_keys=False))
        os.replace(tmp, self.config_file)
        if self.start > 0:
            truncate_jsonl(self.log_file, self.start)
        elif self.log_file.exists():
            self.log_file.unlink()

    # -- 1. one step ------------------------------------------------------------------------------
    def train_step(self, step: int) -> list[str]:
        """Steps 1-3 of the recipe for ``step``; returns the phase's groups."""
        cfg = self.cfg
        seed_all(derive_seed("step", cfg.seed, step))
        self.task.on_step_begin(step, self.acc.is_main_process)
        phase = self.task.phase(step)
        phase = [phase] if isinstance(phase, str) else list(phase)
        bad = [g for g in phase if g not in self.groups]
        if bad:
            raise ValueError(f"task.phase({step}) returned unknown group(s) {bad}; groups: {list(self.groups)}")
        batches: list[dict | None] = [None] * self.accum
        caches: list[dict] = [{} for _ in range(self.accum)]
        self.step_losses: list[Tensor] = []
        self.step_logs: dict[str, Any] = {}
        for pos, group in enumerate(phase):
            self.run_group(step, pos, group, batches, caches)
            self.apply_update(step, group)
        self._check_finite(step, phase)
        return phase

    # -- 2. one group's micro-batches and backward ------------------------------------------------
    def run_group(self, step: int, pos: int, group: str, batches: list, caches: list[dict]) -> None:
        cfg, accum = self.cfg, self.accum
        scaler = self.scalers.get(group)
        for micro in range(accum):
            vrank = self.rank * accum + micro
            if batches[micro] is None:
                batch = self.source.batch(step, vrank, self.world * accum, cfg.batch_size)
                batches[micro] = _to_device(batch, self.device)
            seed_all(derive_seed("loss", cfg.seed, step, pos, vrank))
            with self.acc.autocast():
                out = self.task.loss(batches[micro], step, group, caches[micro])
            loss = getattr(out, "loss", None)
            if not isinstance(loss, Tensor) or loss.numel() != 1:
                raise TypeError(f"task.loss(..., group={group!r}) must return LossOutput with a scalar loss")
            if not loss.requires_grad:
                raise RuntimeError(
                    f"the loss of group {group!r} at step {step} does not require grad; it must depend on "
                    "the group's parameters"
                )
            scaled = loss.reshape(()) / accum
            (scaler.scale(scaled) if scaler is not None else scaled).backward()
            self.step_losses.append(loss.detach().float().reshape(()))
            self._log(f"loss/{group}", loss.detach())
            for k, v in _scalar_logs(out, group).items():
                self._log(k, v)

    def _log(self, key: str, value: Any) -> None:
        self.meter.add(key, value)
        self.step_logs[key] = value

    # -- 3. reduce / unscale / clip / step / EMA --------------------------------------------------
    def apply_update(self, step: int, group: str) -> None:
        cfg, params = self.cfg, self.params[group]
        opt, scaler = self.optimizers[group], self.scalers.get(group)
        self.reduce_grads(group, params)
        if all(p.grad is None for p in params) and group not in self.warned_nograd:
            self.warned_nograd.add(group)
            logger.warning("group %r received no gradient at step %d (its loss ignores its weights?)", group, step)
        if scaler is not None:
            scaler.unscale_(opt)
        with_grad = [p for p in params if p.grad is not None]
        if with_grad:
            if cfg.max_grad_norm is not None:
                norm = torch.nn.utils.clip_grad_norm_(with_grad, cfg.max_grad_norm)
            else:
                norm = total_norm([p.grad for p in with_grad])
            self._log(f"grad_norm/{group}", norm)
        self._log(f"lr/{group}", opt.param_groups[0]["lr"])
        lr_scale = float(self.task.lr_scale(step, group))
        saved_lrs = [pg["lr"] for pg in opt.param_groups]
        if lr_scale != 1.0:
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
        self.schedulers[group].step()
        self.task.zero_grad(set_to_none=True)
        for m in self.groups.values():
            m.zero_grad(set_to_none=True)
        if self.ema is not None and group == self.ema_group:
            self.ema.update(self.groups[self.ema_group])

    def _check_finite(self, step: int, phase: list[str]) -> None:
        if not self.step_losses:
            return
        vals = torch.stack(self.step_losses)
        nonfinite = any_rank((~torch.isfinite(vals)).sum().float().reshape(1), self.world)
        if nonfinite.item() > 0:  # every rank stops together (no one hangs in the next all-reduce)
            done = f"; the last checkpoint is {self.last_ckpt}" if self.last_ckpt is not None else ""
            raise NonFiniteLossError(
                f"non-finite loss at step {step} (groups {phase}): {vals.tolist()}{done}; lower the learning "
                "rate (train.lr / train.default_lr), set train.max_grad_norm or check the inputs"
            )

    # -- 4. log / checkpoint / sample / evaluate --------------------------------------------------
    def after_step(self, done: int) -> None:
        cfg, acc = self.cfg, self.acc
        if self.step_callback is not None:
            self.step_callback(done, {k: float(v) for k, v in self.step_logs.items()})
        if _every(cfg.log_every_steps, done) or done == cfg.max_steps:
            logs = reduce_logs(self.meter.flush(), acc)
            self.last_logs = {**{k: v for k, v in self.last_logs.items() if k.startswith("eval/")}, **logs}
            if acc.is_main_process:
                if self.trackers:
                    acc.log(logs, step=done)
                append_jsonl(self.log_file, {"step": done, **logs})
                post = {k.split("/", 1)[1]: f"{v:.4g}" for k, v in logs.items() if k.startswith("loss/")}
                self.pbar.set_postfix(post, refresh=False)
        if _every(cfg.checkpoint_every_steps, done):
            self.checkpoint(done)
        if self.sample_fn is not None and _every(cfg.sample_every_steps, done):
            self.sample(done)
        if self.eval_fn is not None and _every(self.every_eval, done):
            self.evaluate(done)

    def checkpoint(self, step: int) -> None:
        extra = self.task.state_dict_extra()

        def write() -> Path:
            path = save_checkpoint(
                self.out_dir, step, modules=self.groups, optimizers=self.optimizers, schedulers=self.schedulers,
                scalers=self.scalers, ema=self._ema_pair(), extra=extra,
                trainer_state={"config_hash": self.chash, "world_size": self.world, "grad_accum_steps": self.accum,
                               "config": self._trajectory_config()},
            )
            rotate_checkpoints(self.out_dir, self.cfg.checkpoints_total_limit)
            return path

        on_main(self.acc, write, f"writing checkpoint {step}")
        self.last_ckpt = checkpoint_path(self.out_dir, step)
        self.saved_at = step

    def _with_ema(self, fn: Callable[[], Any]) -> Any:
        if self.ema is None:
            return fn()
        with self.ema.swapped(self.groups[self.ema_group]):
            return fn()

    def sample(self, step: int) -> None:
        self.sampled_at = step

        def run() -> None:
            with torch.no_grad():
                x = self._with_ema(lambda: self.sample_fn(step))
            if x is not None:
                path = save_samples(x, self.out_dir / "samples" / f"step-{step:07d}.png", title=f"step {step}")
                self.samples.append(str(path))

        on_main(self.acc, run, f"sampling at step {step}")

    def evaluate(self, step: int) -> None:
        self.evaluated_at = step
        with torch.no_grad():
            metrics = self._with_ema(lambda: self.eval_fn(step)) or {}
        logs = {f"eval/{k}": float(v) for k, v in metrics.items()}
        self.last_logs.update(logs)
        if self.acc.is_main_process and logs:
            if self.trackers:
                self.acc.log(logs, step=step)
            append_jsonl(self.log_file, {"step": step, **logs})

    # -- the run ----------------------------------------------------------------------------------
    def run(self) -> dict:
        from tqdm.auto import tqdm

        self.setup()
        cfg = self.cfg
        self.pbar = tqdm(total=cfg.max_steps, initial=min(self.start, cfg.max_steps),
                         disable=not (cfg.progress and self.acc.is_local_main_process), desc="train",
                         dynamic_ncols=True)
        previous_handler = self._catch_ctrl_c()
        try:
            for step in range(self.start, cfg.max_steps):
                t0 = time.perf_counter()
                self.train_step(step)
                elapsed = time.perf_counter() - t0
                self.step_time += elapsed
                self.meter.add("time/step_s", elapsed)
                self.pbar.update(1)
                self.after_step(step + 1)
                if self._stop_now():
                    self.stop_at_safe_point(step + 1)
            self.finish()
        finally:
            if previous_handler is not None:
                signal.signal(signal.SIGINT, previous_handler)
            self.pbar.close()
            if self.own_trackers:
                self.acc.end_training()
        return self.result()

    # -- Ctrl-C -------------------------------------------------------------------------------------
    def _catch_ctrl_c(self):
        """The first Ctrl-C only asks the loop to stop after the current step (the weights of a
        half-done step are never saved); a second one stops at once.  Installed only over Python's
        default handler, in the main thread; returns the handler to restore (or None)."""
        self.stop_requested = False
        if threading.current_thread() is not threading.main_thread():
            return None
        previous = signal.getsignal(signal.SIGINT)
        if previous is not signal.default_int_handler:
            return None

        def on_sigint(signum, frame):
            if self.stop_requested:
                raise KeyboardInterrupt
            self.stop_requested = True
            if self.acc.is_main_process:
                print("\n[stepdistill] Ctrl-C: stopping after this step and writing a checkpoint "
                      "(press Ctrl-C again to stop at once, losing the steps since the last checkpoint)",
                      file=sys.stderr, flush=True)

        signal.signal(signal.SIGINT, on_sigint)
        return previous

    def _stop_now(self) -> bool:
        flag = bool(getattr(self, "stop_requested", False))
        if self.world > 1:  # every rank stops at the same step
            flag = any_rank(torch.tensor([float(flag)], device=self.device), self.world).item() > 0
        return flag

    def stop_at_safe_point(self, done: int) -> None:
        """After step ``done`` completed: write its checkpoint (unless just written) and raise
        :class:`~stepdistill.errors.Interrupted` with how to resume."""
        if self.saved_at != done:
            self.checkpoint(done)
        raise Interrupted(
            f"stopped after step {done} of {self.cfg.max_steps}; checkpoint {self.last_ckpt} written; "
            f"resume by running the same command again (train.resume=latest, the default, continues from it; "
            f"train.output_dir={self.out_dir})"
        )

    def finish(self) -> None:
        """The last checkpoint, grid and evaluation (unless the last step already wrote them)."""
        cfg = self.cfg
        self.final = max(self.start, cfg.max_steps)
        ran = cfg.max_steps > self.start
        if self.saved_at != self.final and (ran or self.resumed_from is None):
            self.checkpoint(self.final)
        if ran and self.sample_fn is not None and cfg.sample_every_steps > 0 and self.sampled_at != self.final:
            self.sample(self.final)
        if ran and self.eval_fn is not None and self.every_eval > 0 and self.evaluated_at != self.final:
            self.evaluate(self.final)

    def result(self) -> dict:
        ema_state = self.ema.state_dict_for(self.groups[self.ema_group]) if self.ema is not None else None
        ckpt = self.resumed_from
        return {
            "step": self.final,
            "logs": self.last_logs,
            "output_dir": str(self.out_dir),
            "checkpoint": str(self.last_ckpt) if self.last_ckpt is not None else None,
            "checkpoints": [str(p) for _, p in list_checkpoints(self.out_dir)],
            "samples": self.samples,
            "log_file": str(self.out_dir / "log.jsonl"),
            "config_file": str(self.out_dir / "config.yaml"),
            "resumed_from": str(ckpt) if ckpt is not None else None,
            "ema": ema_state,
            "ema_group": self.ema_group,
            "ema_model": self.ema,
            "accelerator": self.acc,
            "train_seconds": self.step_time,
        }


def train(
    distiller: TrainingTask,
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
    """Train ``distiller`` (any :class:`~stepdistill.training.task.TrainingTask`) on batches from
    ``source`` as ``cfg`` (a ``TrainConfig``) says.

    Args:
        distiller: the task; the trainer calls only the hooks :class:`TrainingTask` declares.
        source: ``source.batch(step, rank, world, batch_size) -> {"real", "raw_cond"}``, a pure
            function of its arguments (``stepdistill.data.sources``).
        sample_fn: ``sample_fn(step) -> (N, C, H, W)`` images in [-1, 1] (or (N, 2) points, or
            None to skip); called on the main process every ``cfg.sample_every_steps`` and at the
            end, with EMA weights swapped into the EMA group; saved as
            ``output_dir/samples/step-<step:07d>.png``.  (The glue passes ``task.sample_images``.)
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
        "config_file", "resumed_from", "ema", "ema_group", "ema_model", "accelerator",
        "train_seconds"}`` where ``ema`` is the EMA group's ``state_dict()`` with averaged weights
        (None without EMA) and ``ema_model`` the :class:`~stepdistill.training.ema.EMA` object.
    """
    cls = Trainer
    from .distributed import sharding_request

    if sharding_request(cfg, accelerator)[0] is not None:
        from .sharded import ShardedTrainer

        cls = ShardedTrainer
    return cls(distiller, source, cfg, sample_fn=sample_fn, eval_fn=eval_fn, accelerator=accelerator,
                   run_config=run_config, eval_every_steps=eval_every_steps, step_callback=step_callback).run()
