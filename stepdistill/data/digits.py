"""scikit-learn's handwritten digits (1 797 real 8x8 images, 10 classes), shipped with sklearn.

Layout chosen: 1 channel, 8x8, values in [-1, 1] (sklearn stores 0..16 grey levels).  8x8 is the
native resolution: up-sampling adds no information and costs 4x compute on a 2-core CPU.

Splits are deterministic (seeded permutation, stratified by class): ``"train"`` (all images, the
teacher's training set), ``"a"``/``"b"`` (two disjoint halves, for the data-vs-data FID floor).
"""

from __future__ import annotations

import numpy as np
import torch

NUM_CLASSES = 10
SHAPE = (1, 8, 8)


def load_digits(split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(images, labels)``: float32 (N, 1, 8, 8) in [-1, 1] and int64 (N,)."""
    from sklearn.datasets import load_digits as _sk

    d = _sk()
    x = torch.from_numpy(d.images.astype(np.float32) / 16.0 * 2.0 - 1.0).unsqueeze(1)
    y = torch.from_numpy(d.target.astype(np.int64))
    if split == "train":
        return x, y
    if split in ("a", "b"):
        rng = np.random.default_rng(12345)
        idx_a, idx_b = [], []
        for c in range(NUM_CLASSES):
            idx = np.flatnonzero(d.target == c)
            rng.shuffle(idx)
            half = len(idx) // 2
            idx_a.extend(idx[:half])
            idx_b.extend(idx[half : 2 * half])
        idx = np.sort(np.array(idx_a if split == "a" else idx_b))
        return x[idx], y[idx]
    raise ValueError(f"digits split must be 'train', 'a' or 'b', got {split!r}")


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float -> uint8 with rounding (as diffusers' numpy_to_pil does)."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
