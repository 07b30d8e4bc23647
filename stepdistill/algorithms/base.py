"""The one small interface every distillation algorithm implements.

A :class:`Distiller` is a :class:`~stepdistill.training.task.TrainingTask` (the trainer's contract:
``trainable / phase / loss`` plus the optional hooks declared there with defaults) that adds a
frozen teacher and the export of its student.  The trainer knows nothing about algorithms.  Each
step it calls ``on_step_begin(step, is_main)`` (side effects), asks ``phase(step)`` (pure) which
trainable groups update, and for each group in that order calls
``loss(batch, step, group, cache)``, back-propagates, clips, and steps that group's optimizer;
then all gradients are zeroed.  ``cache`` is a dict shared by the groups of one step (e.g. DMD2
hands the generator's detached sample to its critic phase).

The algorithm also owns what the glue (``run.py``, ``cli.py``) would otherwise guess:
``build_source`` (its batches), ``sample_images`` (the training-time grid), ``export_groups`` (which
checkpointed groups an export needs) and ``export`` (which pipeline it writes).

A batch is a dict: ``{"real": Tensor | None, "raw_cond": list | Tensor | None}`` where ``real``
holds data in the teacher's sample space (only for algorithms with ``needs_data = True``) and
``raw_cond`` holds class ids or prompts for ``teacher.encode_conditions``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..students import Generator
from ..teachers.base import DiffusionTeacher
from ..training.task import LossOutput, TrainingTask

__all__ = ["NO_PROMPTS_MESSAGE", "Distiller", "LossOutput", "is_text_conditional"]

#: the refusal of a data-free run on a text-conditional teacher
NO_PROMPTS_MESSAGE = (
    "{algo}: the teacher is text-conditional but the run has no prompts, so it would train unconditionally; "
    "set train.dataset=prompts:<file> (one prompt per line; for the embedded text-to-image teacher "
    "train.dataset=prompts:train_300.txt)"
)


def is_text_conditional(teacher) -> bool:
    """Whether ``teacher`` is conditioned on prompts it cannot draw itself (SD / SDXL / SD3 / FLUX
    text encoders; wrappers such as DisBack's node target delegate the question)."""
    if getattr(teacher, "num_classes", None) is not None:
        return False
    if teacher.random_raw_conditions(1, torch.Generator().manual_seed(0)) is not None:
        return False
    return getattr(teacher, "tokenizer", None) is not None or getattr(teacher, "text_encoder", None) is not None


class Distiller(TrainingTask, ABC):
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

    @abstractmethod
    def loss(self, batch: dict, step: int, group: str, cache: dict) -> LossOutput:
        """The loss whose gradient updates ``group`` at ``step``."""

    @abstractmethod
    def generator_for_export(self) -> Generator:
        """The student that :meth:`export` turns into a pipeline."""

    def frozen_modules(self) -> list[nn.Module]:
        return [self.teacher] if isinstance(self.teacher, nn.Module) else []

    # -- what the glue asks the algorithm ----------------------------------------------------------
    def build_source(self, train_cfg: Any, rank: int = 0, world: int = 1):
        """The batch source of a run (``train.dataset`` or data-free conditions)."""
        from ..data.sources import build_source

        source = build_source(train_cfg, self.teacher, needs_data=self.needs_data)
        if is_text_conditional(self.teacher) and getattr(source, "teacher", None) is not None:
            # a data-free ConditionSource: a text teacher draws no prompts of its own, so every step
            # would be unconditional (and CFG skipped) without a word
            from ..config import ConfigError

            raise ConfigError(NO_PROMPTS_MESSAGE.format(algo=self.name))
        for m in self.modules():  # the run's conditions, e.g. the prompts of text-teacher regression pairs
            if isinstance(m, Distiller):
                m.condition_source = source
        return source

    def grid_conditions(self, n: int, generator: torch.Generator | None = None):
        """Raw conditions of the sample grid: classes ``0, 1, 2, ...`` cycling for class-conditional
        teachers, the run's prompts cycling for text teachers (:meth:`build_source` keeps the
        source), the teacher's random draw otherwise, None when unconditional."""
        raw = self.teacher.random_raw_conditions(n, generator)
        if raw is not None and getattr(self.teacher, "num_classes", None):
            raw = torch.arange(n, device="cpu") % self.teacher.num_classes  # host data, encoded later
        if raw is None and is_text_conditional(self.teacher):
            # text teachers: the run's first prompts, cycling (a grid of null-prompt samples shows nothing)
            prompts = getattr(getattr(self, "condition_source", None), "prompts", None)
            if prompts:
                raw = [prompts[i % len(prompts)] for i in range(n)]
        return raw

    def sample_images(self, n: int, generator: torch.Generator | None = None) -> Tensor | None:
        """``n`` samples of the export student, decoded to [-1, 1] ((N, 2) points for 2-D toys)."""
        student = self.generator_for_export()
        raw = self.grid_conditions(n, generator)
        cond = self.teacher.encode_conditions(raw) if raw is not None else None
        # the seeded CPU generator draws the grid noise (the same grid on every device), then it moves
        # to the student's device
        device = self.teacher.sigmas.device
        z = torch.randn((n, *student.sample_shape), generator=generator, device="cpu").to(device)
        was = student.training
        student.eval()
        with torch.no_grad():
            img = self.teacher.decode(student(z, cond, generator=generator))
        student.train(was)
        return img.clamp(-1, 1) if img.ndim == 4 else img

    def exportable(self) -> bool:
        """Whether :meth:`export` can write a pipeline (a diffusers teacher network to build from;
        analytic toy teachers have none)."""
        return isinstance(getattr(self.teacher, "model", None), nn.Module)

    def export(self, output_dir: str | Path, *, ema_state: dict | None = None, extra: dict | None = None,
               overwrite: bool = False, lora: str = "auto") -> Path | None:
        """The one-step student as a diffusers pipeline folder (None when not :meth:`exportable`).

        ``lora`` (``stepdistill export RUN --lora``): what a LoRA student (``generator_lora``) of a
        text-to-image teacher is written as -- ``"auto"`` / ``"both"``: the fused stock pipeline and
        ``pytorch_lora_weights.safetensors``; ``"adapter"``: the LoRA weights, scheduler and card
        only; ``"fused"``: the full pipeline only (``docs/lora.md``).  ``"adapter"`` / ``"both"``
        on a student without an adapter, or whose pipeline has no LoRA loader, raise
        :class:`~stepdistill.export.common.ExportModeError` before anything is written."""
        from ..export.common import check_lora_mode

        check_lora_mode(lora)
        if not self.exportable():
            return None
        from ..export import export_generator

        return export_generator(self.generator_for_export(), self.teacher, Path(output_dir), algorithm=self.name,
                                paper=self.paper, extra=extra, use_ema_state=ema_state, overwrite=overwrite,
                                lora=lora)

    # -- helpers shared by algorithms ----------------------------------------------------------
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
