"""Sampling exported pipelines from the command line (``stepdistill sample``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


def load_pipeline(path: str | Path):
    """Load any pipeline folder written by stepdistill (stock or self-contained custom class)."""
    from diffusers import DiffusionPipeline

    path = Path(path)
    if not (path / "model_index.json").exists():
        raise FileNotFoundError(f"{path} is not a diffusers pipeline folder (no model_index.json)")
    pipe = DiffusionPipeline.from_pretrained(str(path), trust_remote_code=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sample_images(pipe, num_images: int, seed: int = 0, steps: int | None = None,
                  class_labels: list[int] | None = None, prompt: str | None = None,
                  batch_size: int = 64) -> np.ndarray:
    """Images as uint8 NHWC; image i uses ``torch.Generator().manual_seed(seed + i)``."""
    num_classes = pipe.config.get("num_classes") if hasattr(pipe, "config") else None
    out = []
    for start in range(0, num_images, batch_size):
        idx = list(range(start, min(num_images, start + batch_size)))
        gens = [torch.Generator().manual_seed(seed + i) for i in idx]
        kwargs = {"generator": gens, "output_type": "np"}
        if steps is not None:
            kwargs["num_inference_steps"] = steps
        if num_classes:
            labels = class_labels or list(range(num_classes))
            kwargs["class_labels"] = [labels[i % len(labels)] for i in idx]
        elif prompt is not None or "text_encoder" in pipe.components:
            kwargs["prompt"] = [prompt or ""] * len(idx)
        else:
            kwargs["batch_size"] = len(idx)
        imgs = pipe(**kwargs).images
        out.append(np.asarray(imgs))
    arr = np.concatenate(out)
    return (arr * 255).round().clip(0, 255).astype(np.uint8)


def sample_to_path(pipeline: str | Path, output: str | Path, **kw) -> Path:
    from .training.images import save_image_grid

    pipe = load_pipeline(pipeline)
    imgs = sample_images(pipe, **kw)
    output = Path(output)
    x = torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 127.5 - 1
    if output.suffix.lower() == ".png":
        save_image_grid(x, output)
    else:
        from PIL import Image

        output.mkdir(parents=True, exist_ok=True)
        for i, im in enumerate(imgs):
            Image.fromarray(im.squeeze(-1) if im.shape[-1] == 1 else im).save(output / f"{i:06d}.png")
    return output
