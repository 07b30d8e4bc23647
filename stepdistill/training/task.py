"""The task contract: every hook the trainer (``stepdistill.training.loop.Trainer``) calls.

A :class:`TrainingTask` is an ``nn.Module`` holding the trainable groups (one optimizer each) and
whatever frozen networks its losses need.  The trainer never probes for optional methods: every hook
is declared here with a default, so a task overrides only what it needs.

Per step ``s`` the trainer calls, in this order::

    task.on_step_begin(s, is_main)         # side effects (files, weight swaps), once per step
    groups = task.phase(s)                 # pure: which groups update, in order
    for group in groups:
        for each micro-batch: task.loss(batch, s, group, cache) -> LossOutput ; backward
        reduce / unscale / clip ; lr x task.lr_scale(s, group) ; optimizer step ; EMA

``phase`` must be a pure function of ``step`` and of the state restored by
``load_state_dict_extra`` (tests, tools and sample grids may call it freely, repeatedly and out of
order); anything that changes state belongs in ``on_step_begin``, which the trainer calls exactly
once per executed step (on every process; ``is_main`` tells where files may be written), also on
the first step after a resume, so a resumed run replays the same sequence of side effects.

The distillation algorithms extend this with a teacher and an export
(:class:`stepdistill.algorithms.base.Distiller`); the teacher trainers
(:mod:`stepdistill.training.tasks`) are tasks of their own.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from torch import Tensor, nn


@dataclass
class LossOutput:
    """What :meth:`TrainingTask.loss` returns.

    ``loss`` is a scalar tensor, back-propagated into the phase's group.  ``logs`` holds scalars for
    the logger: Python numbers or 0-d / one-element tensors.  Tensors stay on the device: the trainer
    sums them there and converts once per log interval, so returning ``loss.detach()`` instead of
    ``float(loss)`` saves a host sync per micro-batch.
    """

    loss: Tensor
    logs: dict[str, float | Tensor] = field(default_factory=dict)


class TrainingTask(nn.Module, ABC):
    """Base class of everything the generic trainer can train (see the module docstring)."""

    #: short name (model cards, logs)
    name: ClassVar[str] = "task"
    #: True if the task consumes real data (``batch["real"]``); False = data-free
    needs_data: ClassVar[bool] = False
    #: the group whose weights the EMA averages (``train.ema_decay``); None = ``"generator"`` if
    #: there is one, else the only group
    ema_group: str | None = None

    # -- required ---------------------------------------------------------------------------------
    @abstractmethod
    def trainable(self) -> dict[str, nn.Module]:
        """Trainable groups, one optimizer each: ``{"generator": ..., "critic": ...}``."""

    @abstractmethod
    def loss(self, batch: dict, step: int, group: str, cache: dict) -> LossOutput:
        """The loss whose gradient updates ``group`` at ``step``; ``cache`` is shared by the groups
        of one micro-batch (e.g. the generator's detached sample for the critic)."""

    # -- schedule ---------------------------------------------------------------------------------
    def phase(self, step: int) -> list[str]:
        """Groups updated at ``step``, in order (pure).  Default: every group every step."""
        return list(self.trainable())

    def on_step_begin(self, step: int, is_main: bool) -> None:
        """Side effects before step ``step`` (called once per step on every process, before
        :meth:`phase`); write files only where ``is_main``."""

    def lr_defaults(self) -> dict[str, float]:
        """Per-group learning rates (the run config's ``train.lr`` overrides them)."""
        return {}

    def lr_scale(self, step: int, group: str) -> float:
        """Multiplier on ``group``'s learning rate for the update at ``step`` (e.g. a warm-start)."""
        return 1.0

    def frozen_modules(self) -> list[nn.Module]:
        """Networks that must never be trained (a teacher): kept in eval mode, and a trainable
        group holding one of their parameters is an error."""
        return []

    def resolve_ema_group(self, groups: dict[str, nn.Module]) -> str | None:
        """The EMA group: :attr:`ema_group`, else ``"generator"``, else the only group, else None."""
        if self.ema_group is not None:
            return self.ema_group
        if "generator" in groups:
            return "generator"
        return next(iter(groups)) if len(groups) == 1 else None

    # -- files and resume -------------------------------------------------------------------------
    def set_output_dir(self, output_dir: Path) -> None:
        """The run folder, before training starts (for tasks keeping files of their own)."""

    def state_dict_extra(self) -> dict | None:
        """JSON-able non-parameter state saved with each checkpoint (None = nothing)."""
        return None

    def load_state_dict_extra(self, state: dict) -> None:
        """Restore :meth:`state_dict_extra` on resume."""

    # -- outputs ----------------------------------------------------------------------------------
    def sample_images(self, n: int, generator: Any = None) -> Tensor | None:
        """``n`` images in [-1, 1] for the training-time grid ((N, 2) points for 2-D toys), or None
        (no grid).  The trainer calls it on the main process under ``torch.no_grad()`` with the EMA
        weights swapped in; ``generator`` is a seeded CPU ``torch.Generator``."""
        return None

    def export_groups(self) -> list[str]:
        """The trainable groups whose weights :meth:`export` needs (loaded from a checkpoint by
        ``stepdistill export RUN``); EMA weights are used for the EMA group when saved."""
        group = self.resolve_ema_group(self.trainable())
        return [group] if group is not None else list(self.trainable())

    def export(self, output_dir: str | Path, *, ema_state: dict | None = None, extra: dict | None = None,
               overwrite: bool = False) -> Path | None:
        """Write the trained result as a pipeline folder; None if this task has nothing to export.

        ``ema_state``: the EMA group's averaged ``state_dict`` to export instead of the live weights."""
        return None

    def run_info(self) -> dict:
        """Extra entries for the result dict of a run (e.g. Distilled Decoding's pair set)."""
        return {}


__all__ = ["LossOutput", "TrainingTask"]
