"""Helpers for tests (the package's and downstream users'): a quickly trained digits detector."""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from pathlib import Path

__all__ = ["tiny_digits_detector_dir"]


@functools.cache
def tiny_digits_detector_dir(steps: int = 120, seed: int = 0) -> Path:
    """Train a digits detector with few steps once per process (a few seconds on CPU) and return its
    folder.  Weak (~90-95 % accuracy) but a real trained network; removed at interpreter exit."""
    from .detectors import train_digits_detector

    root = Path(tempfile.mkdtemp(prefix="stepdistill-test-detector-"))
    atexit.register(shutil.rmtree, root, True)
    out = root / "digits-v1"
    train_digits_detector(out, steps=steps, seed=seed)
    return out
