"""The process-group side of the trainer: the launch boundary and the collective helpers.

Models are *not* wrapped in DDP (generator losses back-propagate through critics, and DDP's hooks
and ``requires_grad`` toggling break on that): every rank starts from rank 0's weights
(:func:`broadcast_modules`) and each group's gradients are averaged explicitly after its
micro-batches (:func:`all_reduce_grads`).  Files are written by the main process only
(:func:`on_main`, which tells every rank whether it worked so no one hangs).

Supported launches: one process, ``accelerate launch`` multi-process (``MULTI_GPU``, ``MULTI_CPU``,
...), and sharded runs -- ``train.sharding: fsdp2`` or an ``accelerate launch`` FSDP launch, which
stepdistill reads as "shard the trainable groups with FSDP2" (:mod:`stepdistill.training.sharded`;
the Accelerator itself is then made without accelerate's FSDP plugin, and the start line says
``sharding=fsdp2``).  DeepSpeed launches are refused by :func:`make_accelerator` /
:func:`check_launch` with a one-line message.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..config import ConfigError

logger = logging.getLogger("stepdistill.training")

_BUCKET_NUMEL = 1 << 23  # 32 MiB of fp32 per all-reduce

SHARDING_KINDS = ("fsdp2",)

_REFUSED = {
    "DEEPSPEED": "DeepSpeed launches are not supported (stepdistill averages gradients itself and its "
                 "multi-group optimizers do not map onto a DeepSpeed engine); launch without a DeepSpeed config",
}


def tracker_backend(value: str | None) -> str | None:
    """``train.report_to`` as accelerate's ``log_with`` (None for none / null / false / empty)."""
    if value is None or str(value).strip().lower() in ("", "none", "null", "false"):
        return None
    return value


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes")


def sharding_request(cfg: Any, acc: Any = None) -> tuple[str | None, str]:
    """``(kind, why)`` of the sharding this run asked for: ``("fsdp2", "train.sharding: fsdp2")``,
    ``("fsdp2", "FSDP launch ...")`` (``ACCELERATE_USE_FSDP`` or an FSDP accelerator) or ``(None, "")``."""
    value = getattr(cfg, "sharding", None)
    if value is not None and str(value).strip().lower() not in ("", "none", "no", "null", "false"):
        kind = str(value).strip().lower()
        if kind not in SHARDING_KINDS:
            raise ConfigError(f"train.sharding must be null or one of {', '.join(SHARDING_KINDS)}, got {value!r}")
        return kind, "train.sharding: fsdp2"
    if _env_true("ACCELERATE_USE_FSDP"):
        version = os.environ.get("FSDP_VERSION", "1")
        return "fsdp2", (f"FSDP launch, fsdp_version {version}: stepdistill shards with FSDP2 fully_shard itself, "
                         "accelerate's FSDP plugin options are not used")
    if acc is not None and "FSDP" in str(getattr(acc.distributed_type, "value", acc.distributed_type)).upper():
        return "fsdp2", "FSDP accelerator: stepdistill shards with FSDP2 fully_shard itself"
    return None, ""


def check_launch(acc: Any = None) -> None:
    """Refuse DeepSpeed launches: from the launcher's environment (before an Accelerator exists) or
    from ``acc.distributed_type``.  (FSDP launches are sharded runs: :func:`sharding_request`.)"""
    kinds = []
    if _env_true("ACCELERATE_USE_DEEPSPEED"):
        kinds.append("DEEPSPEED")
    if acc is not None:
        kind = str(getattr(getattr(acc, "distributed_type", None), "value", acc.distributed_type)).upper()
        if kind in _REFUSED:
            kinds.append(kind)
    if kinds:
        raise ConfigError(_REFUSED[kinds[0]])


def launch_state():
    """accelerate's ``PartialState`` of this launch (rank, world size), created the way the
    ``Accelerator`` will create it (``ACCELERATE_USE_CPU`` honoured), for code that needs the rank
    before training starts (e.g. splitting Distilled Decoding's pair generation over ranks)."""
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    return PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))


def _reset_stale_state(mixed_precision: str | None) -> None:
    """AcceleratorState is a per-process singleton: a second train() call in the same process with
    another precision (tests, notebooks, benchmark sweeps) would reuse the first one's.  When
    single-process, forget the old state (accelerate has no public call for this)."""
    from accelerate.state import AcceleratorState, PartialState

    wanted = (mixed_precision or os.environ.get("ACCELERATE_MIXED_PRECISION") or "no").lower()
    old = AcceleratorState._shared_state.get("_mixed_precision")
    if old is not None and old != wanted and PartialState().num_processes <= 1:
        AcceleratorState._reset_state()


def make_accelerator(cfg: Any):
    """An ``Accelerator`` for ``cfg`` (a TrainConfig).  ``train.mixed_precision`` is passed only when
    the config sets it; None leaves the choice to the launcher (``accelerate launch
    --mixed_precision``, its config file, or "no")."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    check_launch()
    project = ProjectConfiguration(project_dir=str(cfg.output_dir), logging_dir=str(cfg.output_dir))
    kw = dict(mixed_precision=cfg.mixed_precision, log_with=tracker_backend(cfg.report_to), project_config=project)
    _reset_stale_state(cfg.mixed_precision)
    fsdp_env = os.environ.pop("ACCELERATE_USE_FSDP", None)  # stepdistill shards itself (sharded.py)
    try:
        acc = Accelerator(**kw)
    finally:
        if fsdp_env is not None:
            os.environ["ACCELERATE_USE_FSDP"] = fsdp_env
    check_launch(acc)
    return acc


def describe_launch(acc: Any, cfg: Any = None) -> str:
    """One line: distributed type, processes, device, mixed precision and sharding of this launch."""
    kind = getattr(acc.distributed_type, "value", acc.distributed_type)
    sharding = sharding_request(cfg, acc)[0] if cfg is not None else None
    return (f"distributed_type={kind} processes={acc.num_processes} device={acc.device.type} "
            f"mixed_precision={acc.mixed_precision} sharding={sharding or 'none (replicated)'}")


def total_norm(grads: list[Tensor]) -> Tensor:
    if hasattr(torch.nn.utils, "get_total_norm"):  # torch >= 2.6
        return torch.nn.utils.get_total_norm(grads)
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))


def _buckets(params: list[nn.Parameter]) -> dict[tuple, list[list[nn.Parameter]]]:
    buckets: dict[tuple, list[list[nn.Parameter]]] = {}
    for p in params:
        key = (p.grad.dtype, p.grad.device)
        lst = buckets.setdefault(key, [[]])
        if lst[-1] and sum(q.numel() for q in lst[-1]) + p.numel() > _BUCKET_NUMEL:
            lst.append([])
        lst[-1].append(p)
    return buckets


@torch.no_grad()
def all_reduce_grads(params: list[nn.Parameter], world: int) -> None:
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
    for (dtype, _), lists in _buckets(active).items():
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
def broadcast_modules(modules: list[nn.Module]) -> None:
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


def on_main(acc: Any, fn: Callable[[], Any], what: str) -> Any:
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


def close_process_group() -> bool:
    """End a finished multi-process run cleanly: wait for every rank, then destroy the default
    process group.  Without it the interpreter tears down gloo's worker threads at exit and a rank
    can abort (``terminate called without an active exception``, SIGABRT) after the work is done.
    Call it only after success -- a rank that failed must not wait for the others.  Returns whether
    a group was closed."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return False
    dist.barrier()
    dist.destroy_process_group()
    return True


def any_rank(flag: Tensor, world: int) -> Tensor:
    """Sum of a per-rank count over processes (so every rank takes the same branch)."""
    if world > 1:
        import torch.distributed as dist

        dist.all_reduce(flag)
    return flag


def reduce_logs(logs: dict[str, float], acc: Any) -> dict[str, float]:
    """Mean of each logged scalar over the processes that logged it."""
    if acc.num_processes <= 1:
        return logs
    import torch.distributed as dist

    gathered: list[Any] = [None] * acc.num_processes
    dist.all_gather_object(gathered, logs)
    keys = sorted(set().union(*[g.keys() for g in gathered]))
    return {k: float(np.mean([g[k] for g in gathered if k in g])) for k in keys}


__all__ = [
    "all_reduce_grads",
    "any_rank",
    "broadcast_modules",
    "check_launch",
    "tracker_backend",
    "describe_launch",
    "launch_state",
    "make_accelerator",
    "on_main",
    "reduce_logs",
    "sharding_request",
    "SHARDING_KINDS",
    "total_norm",
]
