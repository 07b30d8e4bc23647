"""The one small interface every distillation algorithm implements.

The training loop (``stepdistill.training``) knows nothing about algorithms.  Each step it asks
``distiller.phase(step)`` which trainable groups update, and for each group in that order calls
``distiller.loss(batch, step, group, cache)``, back-propagates, clips, and steps that group's
optimizer; then all gradients are zeroed.  ``cache`` is a dict shared by the groups of one step
(e.g. DMD2 hands the generator's detached sample to its critic phase).

A batch is a dict: ``{"real": Tensor | None, "raw_cond": list | Tensor | None}`` where ``real``
holds data in the teacher's sample space (only for algorithms with ``needs_data = True``) and
``raw_cond`` holds class ids or prompts for ``teacher.encode_conditions``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..students import Generator
from ..teachers.base import DiffusionTeacher


@dataclass
class LossOutput:
    loss: Tensor  # scalar; back-propagated into the phase's group
    logs: dict[str, float] = field(default_factory=dict)  # scalars for the logger


class Distiller(nn.Module, ABC):
    name: ClassVar[str]
    paper: ClassVar[str]
    Config: ClassVar[type]
    #: True if the algorithm consumes real data (e.g. DMD2's GAN term); False = data-free.
    needs_data: ClassVar[bool] = False

    def __init__(self, teacher: DiffusionTeacher, config: Any):
        super().__init__()
        self.teacher = teacher
        self.config = config
        teacher.requires_grad_(False)
        teacher.eval()

    @abstractmethod
    def trainable(self) -> dict[str, nn.Module]:
        """Trainable groups, one optimizer each: ``{"generator": ..., "critic": ...}``."""

    def phase(self, step: int) -> list[str]:
        """Groups updated at ``step``, in order.  Default: every group every step."""
        return list(self.trainable())

    @abstractmethod
    def loss(self, batch: dict, step: int, group: str, cache: dict) -> LossOutput:
        """The loss whose gradient updates ``group`` at ``step``."""

    @abstractmethod
    def generator_for_export(self) -> Generator:
        """The student that ``export.py`` turns into a pipeline."""

    # -- helpers shared by algorithms ----------------------------------------------------------
    def lr_defaults(self) -> dict[str, float]:
        """Per-group learning rates the paper uses; the run config may override them."""
        return {}

    def conditions(self, batch: dict, n: int, device) -> Any:
        raw = batch.get("raw_cond")
        if raw is None:
            return None
        return self.teacher.encode_conditions(raw)

    @staticmethod
    def surrogate_loss(x: Tensor, grad: Tensor) -> Tensor:
        """``0.5 * mean((x - sg(x - g))^2)``: injects the per-pixel gradient ``g / numel(x)`` into x.

        (DMD2 and SwiftBrush reduce this way; learning rates are tied to the normalisation.)
        """
        grad = torch.nan_to_num(grad)
        target = (x - grad).detach()
        return 0.5 * torch.nn.functional.mse_loss(x, target, reduction="mean")
