"""The generic accelerate trainer: task contract, checkpoints, exact resume, EMA, logging, sample grids.

* :mod:`.task` -- :class:`TrainingTask` (every hook the trainer calls) and :class:`LossOutput`;
* :mod:`.loop` -- :class:`Trainer` (the step's named stages) and the :func:`train` entry point;
* :mod:`.distributed` -- the launch boundary and the process-group helpers;
* :mod:`.tasks` -- the teacher trainers (denoiser, VQ tokenizer, AR language model) as tasks;
* :mod:`.checkpoint`, :mod:`.ema`, :mod:`.images`, :mod:`.logs`, :mod:`.settings` -- the parts.
"""

from .checkpoint import CheckpointError, latest_checkpoint, list_checkpoints, load_checkpoint_weights
from .ema import EMA
from .images import save_image_grid, save_samples
from .loop import Trainer, config_hash, train
from .task import LossOutput, TrainingTask

__all__ = [
    "train",
    "Trainer",
    "TrainingTask",
    "LossOutput",
    "save_image_grid",
    "save_samples",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint_weights",
    "CheckpointError",
    "EMA",
    "config_hash",
]
