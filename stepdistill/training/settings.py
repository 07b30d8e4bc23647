"""Checks of the ``train`` section and the hash of what shapes a run's trajectory."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from ..config import ConfigError, to_dict

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
    "sharding",  # the same update up to float summation order (tests/test_fsdp.py)
)

_MIXED_PRECISION = ("no", "bf16", "fp16")


# ---------------------------------------------------------------------------------------------
# configuration checks


def plain_config(run_config: Any) -> dict | None:
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


def validate(cfg: Any) -> None:
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
        cfg.mixed_precision is None or cfg.mixed_precision in _MIXED_PRECISION,
        "mixed_precision",
        f"must be null (the launcher's choice) or one of {', '.join(_MIXED_PRECISION)}",
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


def ensure_writable(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"train.output_dir {str(path)!r} is not a writable folder: {e}") from e
