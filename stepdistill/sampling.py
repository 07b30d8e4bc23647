"""Sampling exported pipelines from the command line (``stepdistill sample``).

Generation itself is the evaluation harness's (``stepdistill.eval.generate``): one seed per image,
class ``i % K`` or ``labels[i % len]``, ``trust_remote_code`` for the self-contained pipeline files
stepdistill exports (see ``load_pipeline``'s docstring).
"""

from __future__ import annotations

from pathlib import Path


def sample_to_path(pipeline: str | Path, output: str | Path, num_images: int = 16, seed: int = 0,
                   steps: int | None = None, class_labels: list[int] | None = None,
                   prompt: str | None = None) -> Path:
    """Sample ``num_images`` from a pipeline folder into a PNG grid (``*.png``) or a folder of PNGs."""
    from .eval.generate import load_pipeline, sample_pipeline, save_images
    from .training.images import save_image_grid

    pipe = load_pipeline(pipeline)
    if prompt is None and "text_encoder" in getattr(pipe, "components", {}):
        prompt = ""
    imgs = sample_pipeline(pipe, num_images, seed=seed, class_labels=class_labels,
                           prompts=[prompt] if prompt is not None else None, num_inference_steps=steps,
                           progress=False)
    output = Path(output)
    if output.suffix.lower() == ".png":
        save_image_grid(imgs.float() / 127.5 - 1, output)
    else:
        save_images(output, imgs)
    return output
