"""Sampling exported pipelines from the command line (``stepdistill sample``).

Generation itself is the evaluation harness's (``stepdistill.eval.generate``): one seed per image,
class ``i % K`` or ``labels[i % len]``, ``trust_remote_code`` for the self-contained pipeline files
stepdistill exports (see ``load_pipeline``'s docstring).
"""

from __future__ import annotations

from pathlib import Path

from .errors import InputError


def sample_to_path(pipeline: str | Path, output: str | Path, num_images: int = 16, seed: int = 0,
                   steps: int | None = None, class_labels: list[int] | None = None,
                   prompt: str | None = None) -> Path:
    """Sample ``num_images`` from a pipeline folder into a PNG grid (``*.png``) or a folder of PNGs."""
    from .eval.generate import load_pipeline, sample_pipeline, save_images
    from .training.images import save_image_grid

    if isinstance(num_images, bool) or int(num_images) < 1:
        raise InputError(f"--num-images must be >= 1, got {num_images}")
    if steps is not None and (isinstance(steps, bool) or int(steps) < 1):
        raise InputError(f"--steps must be >= 1 (or left out for the pipeline's own), got {steps}")
    if class_labels is not None:
        if not class_labels:
            raise InputError("--class-labels is empty; pass comma-separated class ids such as 0,1,2")
        if any(int(c) < 0 for c in class_labels):
            raise InputError(f"--class-labels must be class ids >= 0, got {','.join(map(str, class_labels))}")
        if prompt is not None:
            raise InputError("pass either --prompt (text-to-image) or --class-labels (class-conditional), not both")
    output = Path(output)
    if output.exists() and output.suffix.lower() != ".png" and not output.is_dir():
        raise InputError(f"--output {output} is an existing file; name a .png grid or a folder")
    pipe = load_pipeline(pipeline)
    if prompt is None and "text_encoder" in getattr(pipe, "components", {}):
        prompt = ""
    imgs = sample_pipeline(pipe, num_images, seed=seed, class_labels=class_labels,
                           prompts=[prompt] if prompt is not None else None, num_inference_steps=steps,
                           progress=False)
    if output.suffix.lower() == ".png":
        save_image_grid(imgs.float() / 127.5 - 1, output)
    else:
        save_images(output, imgs)
    return output
