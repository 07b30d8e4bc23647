"""The generic accelerate training loop: checkpoints, exact resume, EMA, logging, sample grids."""

from .checkpoint import CheckpointError, latest_checkpoint, list_checkpoints, load_checkpoint_weights
from .ema import EMA
from .images import save_image_grid, save_samples
from .loop import config_hash, train

__all__ = [
    "train",
    "save_image_grid",
    "save_samples",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint_weights",
    "CheckpointError",
    "EMA",
    "config_hash",
]
