"""Small package-wide helpers: the cache folder and the dtype names the configs accept."""

from __future__ import annotations

import os
from pathlib import Path

import torch

#: dtype names accepted by the configs (``teacher.dtype``, Distilled Decoding's flow / storage dtypes)
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}


def cache_dir() -> Path:
    """The package's cache folder: ``$STEPDISTILL_CACHE`` (``~`` expanded) if set and non-empty, else
    ``~/.cache/stepdistill``.  Embedded teachers, detectors, reference statistics and Distilled
    Decoding pair sets live below it."""
    env = os.environ.get("STEPDISTILL_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "stepdistill"


__all__ = ["DTYPES", "cache_dir"]
