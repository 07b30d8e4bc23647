"""Sample grids (PNG) for training runs and the CLI."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

__all__ = ["make_grid", "save_image_grid", "save_scatter", "save_samples"]


def _to_uint8(images: Tensor) -> Tensor:
    """[-1, 1] float -> uint8 with rounding (as diffusers' numpy_to_pil and data.digits.to_uint8)."""
    return ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def make_grid(
    images: Tensor, nrow: int | None = None, upscale_to: int = 64, padding: int = 2, pad_value: int = 255
) -> np.ndarray:
    """Tile (N, C, H, W) images in [-1, 1] (C = 1 or 3) into one uint8 array (H', W', C).

    ``nrow`` images per row (default ``ceil(sqrt(N))``).  Images smaller than ``upscale_to`` pixels
    (shorter side) are enlarged by the smallest integer factor that reaches it, nearest neighbour,
    so that 8x8 digits stay crisp.  The tiling is ``torchvision.utils.make_grid`` (a ``padding``
    frame of ``pad_value`` around and between the tiles, a single image framed too).
    """
    if not isinstance(images, Tensor):
        images = torch.as_tensor(np.asarray(images))
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images must have shape (N, 1|3, H, W), got {tuple(images.shape)}")
    n, c, h, w = images.shape
    if n == 0:
        raise ValueError("no images to put in a grid")
    x = _to_uint8(images)
    if upscale_to and min(h, w) < upscale_to:
        f = math.ceil(upscale_to / min(h, w))
        x = x.repeat_interleave(f, dim=2).repeat_interleave(f, dim=3)
    nrow = max(1, min(n, nrow or math.ceil(math.sqrt(n))))
    if n == 1:  # torchvision returns a lone image without the frame every other grid has
        grid = torch.nn.functional.pad(x[0], (padding,) * 4, value=pad_value)
    else:
        from torchvision.utils import make_grid as tv_make_grid

        grid = tv_make_grid(x, nrow=nrow, padding=padding, pad_value=pad_value)[:c]  # it copies 1 channel to 3
    return grid.permute(1, 2, 0).numpy()


def _atomic_save(img, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    img.save(tmp, format="PNG")
    os.replace(tmp, path)
    return path


def save_image_grid(images: Tensor, path: str | Path, nrow: int | None = None, upscale_to: int = 64) -> Path:
    """Save (N, C, H, W) images in [-1, 1] as one PNG grid (see :func:`make_grid`)."""
    from PIL import Image

    arr = make_grid(images, nrow=nrow, upscale_to=upscale_to)
    img = Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr)
    return _atomic_save(img, Path(path))


def save_scatter(points: Tensor, path: str | Path, title: str | None = None) -> Path:
    """Scatter plot PNG of 2-D samples (N, 2) (toy-mixture runs)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    pts = torch.as_tensor(points).detach().float().cpu().reshape(len(points), -1)
    if pts.shape[1] != 2:
        raise ValueError(f"scatter plots need (N, 2) points, got {tuple(points.shape)}")
    fig, ax = plt.subplots(figsize=(4, 4), dpi=100)
    ax.scatter(pts[:, 0].numpy(), pts[:, 1].numpy(), s=3, alpha=0.6)
    ax.set_aspect("equal")
    if title:
        ax.set_title(title)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    fig.savefig(tmp, format="png", bbox_inches="tight")
    plt.close(fig)
    os.replace(tmp, path)
    return path


def save_samples(samples: Tensor, path: str | Path, title: str | None = None) -> Path:
    """Grid for image batches (N, 1|3, H, W); scatter plot for 2-D points (N, 2)."""
    if samples.ndim == 4:
        return save_image_grid(samples, path)
    if samples.ndim == 2 and samples.shape[1] == 2:
        return save_scatter(samples, path, title=title)
    raise ValueError(
        f"sample_fn must return (N, 1|3, H, W) images or (N, 2) points, got {tuple(samples.shape)}"
    )
